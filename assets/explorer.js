// The Explorer holds a click on a head in B1, C1 or D1 of a zoomed graph for plotly's double-click
// delay and drops it when a second mousedown on the same graph follows within that delay (a
// double-click resets the zoom only; app/pages/explorer.py): remember each graph's last two
// mousedowns (capture phase, before plotly sees them) and whether the graph was zoomed at each.
// A mousedown on a head's point (plotly's hover data) of those graphs, or on an image in A, also asks
// the server to compute that head's (image's) online results (hsWarm) while the click goes through
// Dash, before the views ask.
window.addEventListener('mousedown', e => {
    const graph = e.target.closest && e.target.closest('.dash-graph');
    if (!graph || !graph.id) { return; }
    const gd = graph.querySelector('.js-plotly-plot');
    const same = window.hsDown && window.hsDown.id === graph.id ? window.hsDown : {t: -Infinity, zoomed: false};
    const zoomed = window.hsDoubleClickMatters(gd);
    window.hsDown = {id: graph.id, t: Date.now(), zoomed, prev: same.t, prevZoomed: same.zoomed};
    const hover = ['a-graph', 'b1-graph', 'c1-graph', 'd1-graph'].includes(graph.id) && gd && gd._hoverdata && gd._hoverdata[0];
    const cd = hover && hover.customdata, url = new URLSearchParams(window.location.search);
    if (Array.isArray(cd) && (cd.length === 2 || cd.length === 3)) {
        window.hsWarm({run: url.get('run'), image: url.get('image')}, cd);
    } else if (graph.id === 'a-graph' && Number.isInteger(cd) && url.get('layer') !== null && url.get('head') !== null) {
        window.hsWarm({run: url.get('run'), image: cd}, [url.get('layer'), url.get('head')]);  // an image: the head as it is
    }
}, true);

// The view a figure was drawn with, axis by axis ({range, autorange} as the figure gives them), kept
// on its graph div (gd._hsOwnView) when dcc.Graph draws it: a graph whose axes are not as its
// figure drew them is zoomed or panned. dcc.Graph draws a figure again after a zoom, with the zoom
// written into its layout, so a figure's view is read the first time its data is seen (OWN_VIEWS,
// keyed by the data array, which a zoom leaves as it is). It is also where a double-click goes back
// to (GRAPH_CONFIG doubleClick: 'reset', app/views.py): plotly resets an axis to its
// _rangeInitial0/1, which it saves only when a graph is first plotted with data (dcc.Graph's first,
// empty figure), else it autoranges.
const OWN_VIEWS = new WeakMap();
(function keepOwnViews() {
    const wrap = P => {
        if (!P || !P.react || P.react.hsOwnViews) { return P; }
        const react = P.react;
        P.react = function (gd, figure, ...rest) {
            const el = typeof gd === 'string' ? document.getElementById(gd) : gd, layout = figure && figure.layout;
            const key = figure && Array.isArray(figure.data) ? figure.data : null;
            if (key && !OWN_VIEWS.has(key)) {
                const view = {};
                for (const k of Object.keys(layout || {}).filter(k => /^[xy]axis\d*$/.test(k))) {
                    const ax = layout[k] || {}, range = Array.isArray(ax.range) && !ax.autorange ? ax.range.slice() : null;
                    view[k] = {range, autorange: range ? false : (ax.autorange === 'reversed' ? 'reversed' : true)};
                }
                OWN_VIEWS.set(key, view);
            }
            const own = key ? OWN_VIEWS.get(key) : {};
            const out = react.call(this, gd, figure, ...rest);
            Promise.resolve(out).then(() => {
                if (!el || !el._fullLayout || !key) { return; }
                el._hsOwnView = own;
                for (const [k, v] of Object.entries(own)) {
                    const ax = el._fullLayout[k];
                    if (ax && v && v.range) { [ax._rangeInitial0, ax._rangeInitial1, ax._autorangeInitial] = [...v.range, false]; }
                }
            }, () => {});
            return out;
        };
        P.react.hsOwnViews = true;
        return P;
    };
    // wrap plotly.js's react the moment plotly.js defines window.Plotly, before any figure is drawn
    if (window.Plotly) { wrap(window.Plotly); return; }
    let plotly;
    Object.defineProperty(window, 'Plotly', {configurable: true, enumerable: true, get: () => plotly,
                                             set: P => { plotly = wrap(P); }});
})();

// Would a double-click on plotly graph ``gd`` change its view, i.e. is an axis zoomed or panned away
// from the figure's own view? Only then is a click held (app/pages/explorer.py). A selection drag
// mode (lasso, box) may have a selection that a double-click clears: held too.
window.hsDoubleClickMatters = function (gd) {
    const fl = gd && gd._fullLayout, own = gd && gd._hsOwnView;
    if (!fl || !own || fl.dragmode === 'lasso' || fl.dragmode === 'select') { return true; }
    return Object.keys(fl).filter(k => /^[xy]axis\d*$/.test(k)).some(k => {
        const ax = fl[k], mine = own[k] || {range: null, autorange: true};
        if (ax.fixedrange) { return false; }
        if (!mine.range) { return ax.autorange !== mine.autorange; }
        const tol = 1e-9 * Math.abs(mine.range[1] - mine.range[0]);
        return ax.autorange !== false || mine.range.some((v, i) => !(Math.abs(ax.range[i] - v) <= tol));
    });
};

// From a head's mousedown, or while its click is held, the server computes what the views will ask
// for once it is let through: the head's partial pruning and attention on the image (/api/warm,
// app/server.py; concurrent asks of one result wait for one computation). A dropped click (a
// double-click) costs only that computation, which stays in the online cache.
window.hsWarm = function (sel, pick) {
    const s = sel || {}, [image, layer, head] = pick.length === 3 ? pick : [s.image, pick[0], pick[1]];
    if (!s.run || image === null || image === undefined) { return; }
    fetch(window.hsUrl.base() + 'api/warm?' + new URLSearchParams({run: s.run, image, layer, head})).catch(() => {});
};
