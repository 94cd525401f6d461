"""Screenshot of the saliency panel on the photos run (assets/screenshot_saliency.png), served on a free port
(no dash_duo fixed ports): python scripts/screenshot_saliency.py (needs /work/runs/photos built with --patch-maps)."""
import threading, time, sys
sys.path.insert(0, "tests"); sys.path.insert(0, ".")
from conftest import free_port, pytest_setup_options
from pathlib import Path
from app import create_app
from selenium import webdriver
from werkzeug.serving import make_server

app = create_app(Path("/work/runs"), "photos")
port = free_port()
srv = make_server("127.0.0.1", port, app.server, threaded=True)
threading.Thread(target=srv.serve_forever, daemon=True).start()
d = webdriver.Chrome(options=pytest_setup_options())
d.get(f"http://127.0.0.1:{port}/?run=photos&image=22&layer=11&head=0")
js = lambda e: d.execute_script(e)
t0 = time.time()
while time.time() - t0 < 240:
    ok = js("const g = document.querySelector('#sal-graph .js-plotly-plot'), h = document.querySelector('#sal-deletion .js-plotly-plot');"
            "return !!(g && g.data && g.data.length && g.layout.title && h && h.data && h.data.length === 3);")
    if ok:
        break
    time.sleep(1)
print("drawn", ok, round(time.time() - t0, 1), "s;", js("return document.querySelector('#sal-msg').innerText"))
time.sleep(2)
el = d.find_element("css selector", "#saliency-panel")
# the panel is a narrow column at 1680 px: widen it on its own (over its neighbours) for the picture
d.execute_script("arguments[0].style.cssText += 'position:relative; z-index:1000; background:white; width:600px; padding:6px;';"
                 "window.dispatchEvent(new Event('resize')); setTimeout(() => arguments[0].querySelectorAll('.js-plotly-plot').forEach(g => Plotly.Plots.resize(g)), 1500);", el)
time.sleep(4)
d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
time.sleep(1)
el.screenshot("assets/screenshot_saliency.png")
print([l for l in d.get_log("browser") if l["level"] == "SEVERE"])
d.quit(); srv.shutdown()
