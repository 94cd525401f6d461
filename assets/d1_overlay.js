// D1's selection layer (app/pages/explorer.py, view_d1). The background of D1 (every head of every
// image: 10^4-10^5 WebGL points) is slow to redraw, so it is redrawn only when it changes; a new
// selection redraws only this layer: a small plot of its own, laid exactly over the background's
// plot area (same size, margins and axis ranges; it follows zoom, pan and resizes) that takes no
// mouse events, so hover, click, lasso and zoom all reach the background's points beneath it.
(function () {
  const state = {traces: [], tries: 0};

  function parts() {
    const host = document.getElementById('d1-overlay');
    return {host, plot: host && host.firstElementChild, bg: document.querySelector('#d1-graph .js-plotly-plot')};
  }

  function sync() {
    const {host, plot, bg} = parts();
    if (!host || !plot || !bg || !window.Plotly || !bg._fullLayout || !bg._fullLayout._size) {
      return false;
    }
    if (!bg.__hsOverlay && bg.on) {  // follow every redraw of the background (zoom, pan, new figure, resize)
      bg.__hsOverlay = true;
      bg.on('plotly_afterplot', sync);
      bg.on('plotly_relayouting', () => { plot.style.visibility = 'hidden'; });
    }
    const fl = bg._fullLayout, s = fl._size;
    const ok = fl.xaxis && fl.yaxis && fl.xaxis.range && fl.yaxis.range && bg.data && bg.data.length;
    const r = bg.getBoundingClientRect(), p = host.getBoundingClientRect();
    plot.style.left = (r.left - p.left) + 'px';
    plot.style.top = (r.top - p.top) + 'px';
    const axis = (a) => ({range: a.range.slice(), visible: false, fixedrange: true, type: a.type});
    const layout = {
      width: fl.width, height: fl.height, showlegend: false, hovermode: false, dragmode: false,
      margin: {l: s.l, r: s.r, t: s.t, b: s.b, pad: 0, autoexpand: false},
      paper_bgcolor: 'rgba(0,0,0,0)', plot_bgcolor: 'rgba(0,0,0,0)',
    };
    if (ok) { layout.xaxis = axis(fl.xaxis); layout.yaxis = axis(fl.yaxis); }
    window.Plotly.react(plot, ok ? state.traces : [], layout, {staticPlot: true, displayModeBar: false, responsive: false});
    plot.style.visibility = 'visible';
    return true;
  }

  function retry() {  // the first selection can arrive before the background has been drawn
    if (!sync() && state.tries++ < 100) { setTimeout(retry, 100); }
  }

  window.dash_clientside = Object.assign({}, window.dash_clientside, {
    d1: {
      draw: function (traces) {
        state.traces = traces || [];
        state.tries = 0;
        retry();
        return (traces || []).length;
      },
    },
  });
})();
