// The view state in the URL (app/server.py). A new state is pushed to the browser history here, as
// the query string selection_query() writes (keys in STATE_KEYS order, ',' and ':' kept), so that
// Back/Forward step through the states; a Back/Forward hands the URL to parse_url on the server
// through the url-popped store (the only way within a page: see the popstate listener).
(function () {
  const KEYS = ['run', 'image', 'layer', 'head', 'mode', 'metric', 'thr', 'd1', 'd1s', 'color', 'scale', 'bins',
                'scope', 'set', 'heads'];  // app/server.py STATE_KEYS (a test compares them)

  function query(sel) {
    const s = sel || {}, pairs = [];
    const enc = v => encodeURIComponent(String(v)).replace(/%2C/gi, ',').replace(/%3A/gi, ':');
    for (const k of KEYS) {
      let v = s[k];
      if (v === null || v === undefined || v === '' || (Array.isArray(v) && !v.length)) { continue; }
      if (k === 'set') { v = v.join(','); }
      if (k === 'heads') { v = v.map(h => h[0] + ':' + h[1]).join(','); }
      pairs.push(k + '=' + enc(v));
    }
    return pairs.length ? '?' + pairs.join('&') : '';
  }

  function base() {  // the app's path prefix as the browser sees it ('/' unless served under a prefix)
    const cfg = document.getElementById('_dash-config');
    return (cfg && JSON.parse(cfg.textContent).requests_pathname_prefix) || '/';
  }

  function write(sel) {
    const q = query(sel), loc = window.location;
    if (sel && q !== loc.search) { window.history.pushState({}, '', loc.pathname + q + loc.hash); }
    return window.dash_clientside.no_update;
  }

  // Registered before any dcc.Location mounts, so this listener runs first. A Back/Forward within the
  // page shown (same path, another state) stops here: dash's page router listens to the URL's search
  // and would render the whole page anew (every view recomputed), racing the controls' sync with sel.
  let shownPath = window.location.pathname;
  window.addEventListener('_dashprivate_pushstate', () => { shownPath = window.location.pathname; });
  window.addEventListener('popstate', event => {
    if (window.location.pathname === shownPath) { event.stopImmediatePropagation(); }
    shownPath = window.location.pathname;
    if (window.dash_clientside && window.dash_clientside.set_props) {  // url-popped: a store of the shell (no DOM node)
      window.dash_clientside.set_props('url-popped', {data: {search: window.location.search, at: Date.now()}});
    }
  });

  window.hsUrl = {KEYS, base, query, write};
})();
