// Selection layers (app/explorer/overview.py view_a, app/explorer/patterns.py view_d1). A graph
// with many points (A's images, D1's 10^4-10^5 heads) is slow to redraw, so it is redrawn only when
// it changes; a new selection redraws only its layer, drawn in the graph's overlay host (app/views.py
// overlaid()): small plots of their own, laid exactly over the graph's plot area (same size, margins
// and axis ranges; they follow zoom, pan and resizes), that take no mouse events, so hover, click,
// lasso and zoom all reach the points beneath. The traces are grouped by ``meta.layer`` into one plot
// each, and a plot is redrawn only when its traces change: a new image does not redraw D1's selected
// head over all images, nor A's set. A layer with ``meta.under`` is drawn under the graph instead (D1's
// density: toggling it redraws none of the graph's points).
(function () {
  const views = {};  // view ('a', 'd1') -> {traces, tries}

  function parts(id) {  // '<view>-graph' and its host '<view>-overlay'
    const host = document.getElementById(id + '-overlay');
    return {host, bg: document.querySelector('#' + id + '-graph .js-plotly-plot')};
  }

  function groups(traces) {  // meta.layer -> [its traces], in the order of their first trace
    const out = new Map();
    for (const t of traces) {
      const k = (t.meta && t.meta.layer) || '';
      if (!out.has(k)) { out.set(k, []); }
      out.get(k).push(t);
    }
    return out;
  }

  function sync(id) {
    const {host, bg} = parts(id), view = views[id];
    if (!host || !bg || !window.Plotly || !bg._fullLayout || !bg._fullLayout._size) {
      return false;
    }
    if (bg.__hsOverlay !== host && bg.on) {  // follow every redraw of the graph (zoom, pan, new figure, resize)
      bg.__hsOverlay = host;
      bg.on('plotly_afterplot', () => sync(id));
      bg.on('plotly_relayouting', () => { host.style.visibility = 'hidden'; });
    }
    const fl = bg._fullLayout, s = fl._size;
    const ok = fl.xaxis && fl.yaxis && fl.xaxis.range && fl.yaxis.range && bg.data && bg.data.length;
    const r = bg.getBoundingClientRect(), p = host.getBoundingClientRect();
    const axis = (a) => ({range: a.range.slice(), visible: false, fixedrange: true, type: a.type});
    const layout = {
      width: fl.width, height: fl.height, showlegend: false, hovermode: false, dragmode: false,
      margin: {l: s.l, r: s.r, t: s.t, b: s.b, pad: 0, autoexpand: false},
      paper_bgcolor: 'rgba(0,0,0,0)', plot_bgcolor: 'rgba(0,0,0,0)',
    };
    if (ok) { layout.xaxis = axis(fl.xaxis); layout.yaxis = axis(fl.yaxis); }
    // one plot per layer name, kept for it: a layer that comes or goes (D1's density) redraws no other
    // (a WebGL plot given another layer's traces would build its context anew)
    const layers = groups(ok ? view.traces : []);
    const plots = new Map([...host.children].map(el => [el.dataset.layer, el]));
    for (const name of layers.keys()) {
      if (!plots.has(name)) {
        const plot = Object.assign(document.createElement('div'), {className: 'overlay-plot'});
        plot.dataset.layer = name;
        plots.set(name, host.appendChild(plot));
      }
    }
    const frame = JSON.stringify([layout, r.left - p.left, r.top - p.top]);
    const order = [...layers.keys()];
    plots.forEach((plot, name) => {
      const traces = layers.get(name) || [];
      // stacked in the traces' order; a layer under the graph (D1's density: the graph's background is transparent)
      plot.style.zIndex = traces.some(t => t.meta && t.meta.under) ? '-1' : String(order.indexOf(name) + 1);
      const shown = frame + JSON.stringify(traces);  // the same traces on the same axes: nothing to redraw
      if (plot.__hsShown === shown) { return; }
      plot.style.left = (r.left - p.left) + 'px';
      plot.style.top = (r.top - p.top) + 'px';
      window.Plotly.react(plot, traces, layout, {staticPlot: true, displayModeBar: false, responsive: false});
      plot.__hsShown = shown;
    });
    host.style.visibility = 'visible';
    return true;
  }

  function retry(id) {  // the first selection can arrive before the graph has been drawn
    if (!sync(id) && views[id].tries++ < 100) { setTimeout(() => retry(id), 100); }
  }

  window.dash_clientside = Object.assign({}, window.dash_clientside, {
    overlay: {
      draw: function (id, traces) {
        views[id] = {traces: traces || [], tries: 0};
        retry(id);
        return (traces || []).length;
      },
      // the clientside callbacks '<view>-selection' -> '<view>-drawn' (app/explorer: A, D1)
      drawA: function (traces) { return window.dash_clientside.overlay.draw('a', traces); },
      drawD1: function (traces) { return window.dash_clientside.overlay.draw('d1', traces); },
    },
  });
})();
