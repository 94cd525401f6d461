// The Explorer holds a click on a head in B1, C1 or D1 for plotly's double-click delay and drops it
// when a second mousedown on the same graph follows within that delay (a double-click resets the
// zoom only; app/pages/explorer.py): remember each graph's last two mousedowns (capture phase).
window.addEventListener('mousedown', e => {
    const graph = e.target.closest && e.target.closest('.dash-graph');
    if (!graph || !graph.id) { return; }
    const last = window.hsDown && window.hsDown.id === graph.id ? window.hsDown.t : -Infinity;
    window.hsDown = {id: graph.id, t: Date.now(), prev: last};
}, true);

// While a head click is held, the server computes what the views will ask for once it is let
// through: the head's partial pruning and attention on the image (/api/warm, app/server.py). A
// dropped click (a double-click) costs only that computation, which stays in the online cache.
window.hsWarm = function (sel, pick) {
    const s = sel || {}, [image, layer, head] = pick.length === 3 ? pick : [s.image, pick[0], pick[1]];
    if (!s.run || image === null || image === undefined) { return; }
    fetch(window.hsUrl.base() + 'api/warm?' + new URLSearchParams({run: s.run, image, layer, head})).catch(() => {});
};
