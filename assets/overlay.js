// Selection layers (app/pages/explorer.py: view_a, view_d1). A graph with many points (A's images,
// D1's 10^4-10^5 heads) is slow to redraw, so it is redrawn only when it changes; a new selection
// redraws only its layer: a small plot of its own in the graph's overlay host,
// laid exactly over the graph's plot area (same size, margins and axis ranges; it follows zoom, pan
// and resizes) that takes no mouse events, so hover, click, lasso and zoom all reach the points
// beneath it.
(function () {
  const layers = {};  // view ('a', 'd1') -> {traces, tries, shown: what its plot (plot) draws}

  function parts(id) {  // app/views.py overlaid(): '<view>-graph' and its host '<view>-overlay'
    const host = document.getElementById(id + '-overlay');
    return {host, plot: host && host.firstElementChild, bg: document.querySelector('#' + id + '-graph .js-plotly-plot')};
  }

  function sync(id) {
    const {host, plot, bg} = parts(id), layer = layers[id];
    if (!host || !plot || !bg || !window.Plotly || !bg._fullLayout || !bg._fullLayout._size) {
      return false;
    }
    if (bg.__hsOverlay !== host && bg.on) {  // follow every redraw of the graph (zoom, pan, new figure, resize)
      bg.__hsOverlay = host;
      bg.on('plotly_afterplot', () => sync(id));
      bg.on('plotly_relayouting', () => { plot.style.visibility = 'hidden'; });
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
    const traces = ok ? layer.traces : [];
    // the same traces on the same axes: nothing to redraw (e.g. the graph's own afterplot after a hover)
    const shown = JSON.stringify([traces, layout, r.left - p.left, r.top - p.top]);
    if (shown !== layer.shown || plot !== layer.plot || plot.style.visibility === 'hidden') {
      plot.style.left = (r.left - p.left) + 'px';
      plot.style.top = (r.top - p.top) + 'px';
      window.Plotly.react(plot, traces, layout, {staticPlot: true, displayModeBar: false, responsive: false});
      layer.shown = shown;
      layer.plot = plot;
    }
    plot.style.visibility = 'visible';
    return true;
  }

  function retry(id) {  // the first selection can arrive before the graph has been drawn
    if (!sync(id) && layers[id].tries++ < 100) { setTimeout(() => retry(id), 100); }
  }

  window.dash_clientside = Object.assign({}, window.dash_clientside, {
    overlay: {
      draw: function (id, traces) {
        layers[id] = Object.assign(layers[id] || {}, {traces: traces || [], tries: 0});
        retry(id);
        return (traces || []).length;
      },
    },
  });
})();
