// Shift-click in B1 adds a head to the head set: Plotly's click events do not carry the modifier
// keys, so remember them at mousedown (capture phase, before Plotly sees the event).
window.addEventListener('mousedown', e => { window.hsShift = e.shiftKey; }, true);
