// The Explorer holds a click on a head in B1, C1 or D1 for plotly's double-click delay and drops it
// when a second mousedown on the same graph follows within that delay (a double-click resets the
// zoom only; app/pages/explorer.py): remember each graph's last two mousedowns (capture phase).
window.addEventListener('mousedown', e => {
    const graph = e.target.closest && e.target.closest('.dash-graph');
    if (!graph || !graph.id) { return; }
    const last = window.hsDown && window.hsDown.id === graph.id ? window.hsDown.t : -Infinity;
    window.hsDown = {id: graph.id, t: Date.now(), prev: last};
}, true);
