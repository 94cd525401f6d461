// The Explorer holds a click on a head in B1, C1 or D1 of a zoomed graph for plotly's double-click
// delay and drops it when a second mousedown on the same graph follows within that delay (a
// double-click resets the zoom only; app/explorer/head_click.py): remember each graph's last two
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
// from the figure's own view? Only then is a click held (app/explorer/head_click.py). A selection drag
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

// [[layer, head], ...] as sel.heads holds it: sorted as the server writes it (app/panels/head_sets.py),
// at most as long as the state declares (app/state.py), null when empty
window.hsHeadSet = function (heads) {
    const max = (window.hsUrl.spec().keys.find(k => k.name === 'heads') || {}).max || heads.length;
    const sorted = heads.slice().sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    return sorted.length ? sorted.slice(0, max) : null;
};

// sel's head set with [layer, head] added, or removed when it is in it
window.hsToggleHead = function (sel, cd) {
    const heads = ((sel || {}).heads || []).map(h => [Number(h[0]), Number(h[1])]);
    const key = h => h[0] + ':' + h[1], i = heads.findIndex(h => key(h) === key(cd));
    if (i >= 0) { heads.splice(i, 1); } else { heads.push([Number(cd[0]), Number(cd[1])]); }
    return window.hsHeadSet(heads);
};

// The Explorer's clientside callbacks (app/explorer/*.py: ClientsideFunction('explorer', name)).
window.dash_clientside = Object.assign({}, window.dash_clientside, {explorer: {
    // d-panel -> D3's title, then d-<key> of every panel of D_PANELS (app/panels/__init__.py): the
    // callback's outputs name them, in that order
    panelSwitch: function (panel) {
        const hide = {display: 'none'}, outs = window.dash_clientside.callback_context.outputs_list;
        return [panel === 'pattern' ? {} : hide, ...outs.slice(1).map(o => o.id === 'd-' + panel ? {} : hide)];
    },

    // sel -> controls, through dash_clientside.set_props (not a declared Output), so the two
    // directions form no dependency cycle; a control set from sel computes the same sel and stops.
    controlsFromState: function (sel) {
        const C = window.dash_clientside, s = sel || {}, D = window.hsUrl.defaults();  // app/state.py
        const t = s.thr || D.thr, kind = t[0] === 'a' ? 'a' : 'q', v = parseFloat(t.slice(1));
        const want = {'metric': s.metric || null, 'a-color': s.color || D.color, 'd1-kind': s.d1 || D.d1,
                      'd1-style': s.d1s || D.d1s, 'scale': s.scale || D.scale, 'bins': s.bins || D.bins,
                      'thr-kind': kind, 'band-scope': s.scope || D.scope};
        if (isFinite(v) && kind === 'q' && v > 0) { want['q-slider'] = Math.max(-1, Math.min(2, Math.log10(v))); }
        if (isFinite(v) && kind === 'a') { want['thr-abs'] = v; }
        // only what changed since the last call on this page (each set_props re-renders the page)
        const root = document.getElementById('explorer-root');
        const last = root && root === C.hs_ctl_el ? C.hs_ctl : {};
        for (const [id, value] of Object.entries(want)) {
            if (last[id] !== value && document.getElementById(id)) { C.set_props(id, {value: value}); }
        }
        C.hs_ctl = want;
        C.hs_ctl_el = root;
        return C.no_update;
    },

    // a control changed by the user -> sel (a default value is written as null: absent from the URL)
    stateFromControls: function (metric, color, d1, d1s, scale, bins, scope, kind, logq, absv, sel, current) {
        const C = window.dash_clientside, nu = C.no_update;
        const trig = (C.callback_context.triggered || []).map(t => t.prop_id.split('.')[0]);
        if (!trig.length) { return nu; }
        const id = trig[0], out = Object.assign({}, sel || {}), D = window.hsUrl.defaults();  // app/state.py
        const dflt = (v, k) => (v === D[k] ? null : v);
        if (id === 'metric' && metric) { out.metric = metric; }  // null: the menu before its options came
        if (id === 'a-color') { out.color = dflt(color, 'color'); }
        if (id === 'd1-kind') { out.d1 = dflt(d1, 'd1'); }
        if (id === 'd1-style') { out.d1s = dflt(d1s, 'd1s'); }
        if (id === 'scale') { out.scale = dflt(scale, 'scale'); }
        if (id === 'bins') { out.bins = dflt(bins, 'bins'); }
        if (id === 'band-scope') { out.scope = dflt(scope, 'scope'); }
        const qthr = () => 'q' + parseFloat(Math.pow(10, logq).toPrecision(3));
        const athr = () => {
            const v = (absv !== null && absv !== undefined && absv !== '') ? Number(absv) : current;
            return (v === null || v === undefined || !isFinite(v)) ? null : 'a' + parseFloat(Number(v).toPrecision(4));
        };
        const was = (sel && sel.thr) || D.thr;
        if (id === 'q-slider' && kind === 'q') { out.thr = qthr(); }
        if (id === 'thr-abs' && kind === 'a') { out.thr = athr() || was; }
        if (id === 'thr-kind' && kind !== was[0]) { out.thr = kind === 'q' ? qthr() : (athr() || was); }
        if (out.thr === D.thr) { out.thr = null; }
        const norm = o => JSON.stringify(Object.keys(o).sort().map(k => [k, o[k] === undefined ? null : o[k]]));
        return norm(out) === norm(sel || {}) ? nu : out;
    },

    // sel -> the k-* stores (app/state.py PARTS), each set only when its part changed
    parts: function (sel) {
        const C = window.dash_clientside, parts = window.hsUrl.parts(sel);
        // the page's stores are new after each visit of the page: compare with what they hold now
        const root = document.getElementById('explorer-root');
        const held = C.hs_parts && root === C.hs_parts_el ? C.hs_parts : [];
        C.hs_parts = parts;
        C.hs_parts_el = root;
        return parts.map((p, i) => JSON.stringify(p) === JSON.stringify(held[i]) ? C.no_update : p);
    },

    // A click in A selects that image in the browser (no round trip before the views update)
    imageClick: function (click, sel) {
        const nu = window.dash_clientside.no_update;
        const id = click && click.points && click.points.length ? click.points[0].customdata : null;
        return Number.isInteger(id) && id !== (sel || {}).image ? Object.assign({}, sel, {image: id}) : nu;
    },

    // A click on a head in B1, C1 or D1 (app/explorer/head_click.py): outputs head-pick, head-click,
    // sel, pick-note. Taken at once on a graph that is not zoomed; else held for plotly's
    // double-click delay and dropped when it was the start of a double-click.
    headClick: function (b1, c1, d1, sel) {
        const C = window.dash_clientside, nu = C.no_update, id = C.callback_context.triggered_id;
        const none = [nu, nu, nu, nu], click = {'b1-graph': b1, 'c1-graph': c1, 'd1-graph': d1}[id];
        if (!click || !click.points || !click.points.length) { return none; }
        const cd = click.points[0].customdata, head = Array.isArray(cd) && (cd.length === 2 || cd.length === 3);
        const gd = document.querySelector('#' + id + ' .js-plotly-plot');
        const delay = (gd && gd._context && gd._context.doubleClickDelay) || 300;
        const ours = e => e && e.id === id && Date.now() - e.t < 5000;  // this click's mousedown, or the next
        const twice = e => ours(e) && e.t - e.prev < delay;  // a mousedown soon after another: a double-click
        const d = ours(window.hsDown) ? window.hsDown : {t: Date.now(), zoomed: window.hsDoubleClickMatters(gd), prev: -Infinity};
        if (!head || (twice(d) && d.prevZoomed)) { return none; }  // a contour, the colour bar; a zoom reset
        if (window.hsShift && id === 'b1-graph' && cd.length === 2) {  // shift-click: that head, toggled in the set
            C.set_props('hs-view', {value: 'set'});
            return [nu, nu, Object.assign({}, sel, {layer: cd[0], head: cd[1], heads: window.hsToggleHead(sel, cd)}), null];
        }
        if (!d.zoomed || twice(d)) {  // not zoomed: taken at once (a double-click there is a click)
            return cd.length === 2 ? [nu, nu, Object.assign({}, sel, {layer: cd[0], head: cd[1]}), null] : [nu, cd, nu, nu];
        }
        window.hsWarm(sel, cd);
        const held = cd.length === 2 ? [cd, nu, nu, nu] : [nu, cd, nu, nu];
        return new Promise(resolve => setTimeout(() => resolve(twice(window.hsDown) ? none : held),
                                                 Math.max(0, d.t + delay - Date.now())));
    },

    // a held click on a head of B1 / C1, let through: that head, on the state as it is now
    headPick: function (pick, sel) {
        const nu = window.dash_clientside.no_update;  // Dash calls it once when the page mounts, with no pick
        return Array.isArray(pick) ? [Object.assign({}, sel, {layer: pick[0], head: pick[1]}), null] : [nu, nu];
    },
}});
