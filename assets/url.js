// The view state in the URL. Its keys, their order, how lists are written, the control defaults and
// the Explorer's k-* parts are declared once in Python (app/state.py) and read here from the page
// (the shell's #hs-state-spec data attribute): a new state is pushed to the browser history as the
// query string selection_query() writes, so that Back/Forward step through the states; a
// Back/Forward hands the URL to parse_url on the server through the url-popped store (the only way
// within a page: see the popstate listener). The URL parse_url read is replaced, not pushed, by the
// state it gave (what it ignored leaves the URL).
(function () {
  let specText = null, specParsed = {keys: [], parts: {}, partWhen: {}};

  function spec() {  // app/state.py browser_spec(), read from the page (the shell renders it)
    const el = document.getElementById('hs-state-spec'), text = el ? el.getAttribute('data-spec') : null;
    if (text && text !== specText) {
      try { specParsed = JSON.parse(text); specText = text; } catch (e) { /* keep the last one */ }
    }
    return specParsed;
  }

  function defaults() {  // {key: what an absent key means}
    return Object.fromEntries(spec().keys.map(k => [k.name, k.default]));
  }

  function join(v, seps) {  // a list value as the URL writes it ([[0, 4], [11, 5]] with [',', ':'] -> '0:4,11:5')
    return Array.isArray(v) ? v.map(x => join(x, seps.slice(1))).join(seps[0] || ',') : String(v);
  }

  function query(sel) {
    const s = sel || {}, pairs = [];
    const enc = v => encodeURIComponent(v).replace(/%2C/gi, ',').replace(/%3A/gi, ':');
    for (const k of spec().keys) {
      const v = s[k.name];
      if (v === null || v === undefined || v === '' || (Array.isArray(v) && !v.length)) { continue; }
      pairs.push(k.name + '=' + enc(join(v, k.join)));
    }
    return pairs.length ? '?' + pairs.join('&') : '';
  }

  function parts(sel) {  // the Explorer's k-* stores, in the declared order: [{key: value}, ...]
    const s = sel || {}, sp = spec(), val = k => (s[k] === undefined || s[k] === '' ? null : s[k]);
    return Object.entries(sp.parts).map(([name, keys]) => {
      const when = sp.partWhen[name], all = when && s[when.if[0]] === when.if[1] ? keys.concat(when.keys) : keys;
      return Object.fromEntries(all.map(k => [k, val(k)]));
    });
  }

  function base() {  // the app's path prefix as the browser sees it ('/' unless served under a prefix)
    const cfg = document.getElementById('_dash-config');
    try { return (cfg && JSON.parse(cfg.textContent).requests_pathname_prefix) || '/'; } catch (e) { return '/'; }
  }

  function write(sel, parsed) {
    const q = query(sel), loc = window.location, url = loc.pathname + q + loc.hash;
    // no state or no declaration read (yet): the URL stays as it is
    if (!sel || !spec().keys.length || q === loc.search) { return window.dash_clientside.no_update; }
    if (parsed && loc.search === parsed.from && q === parsed.query) {
      window.history.replaceState(window.history.state, '', url);  // the URL just parsed, cleaned
    } else {
      window.history.pushState({}, '', url);
    }
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

  window.hsUrl = {spec, defaults, base, query, parts, write, get KEYS() { return spec().keys.map(k => k.name); }};
})();
