"""Screenshot of the Explorer's saliency panel D6 (assets/screenshot_saliency.png) in headless chromium.

    python scripts/screenshot_saliency.py --cache /path/to/runs --run photos [--image 22] [--out assets/screenshot_saliency.png]

The run is best built with --patch-maps (e.g. the default backbone on the photos:
``python scripts/build_cache.py --model default-backbone --dataset photos --patch-maps --out RUNS/photos``),
otherwise the maps are computed online first. The app is served on a free port in this process.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from headless import chromium, serve


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="folder holding the run")
    ap.add_argument("--run", required=True, help="run name under --cache")
    ap.add_argument("--image", type=int, default=22, help="image id (default 22)")
    ap.add_argument("--out", default="assets/screenshot_saliency.png", help="PNG to write")
    args = ap.parse_args(argv)

    base, server = serve(Path(args.cache), args.run)
    driver = chromium()
    try:
        driver.get(f"{base}/?run={args.run}&image={args.image}&layer=11&head=0")
        for _ in range(120):  # the switch over D3 shows D6 in D3-D5's place
            switch = driver.find_elements("css selector", "#d-panel input[value=saliency]")
            if switch:
                driver.execute_script("arguments[0].click();", switch[0])
                break
            time.sleep(0.5)
        drawn = ("const g = document.querySelector('#sal-graph .js-plotly-plot'), "
                 "h = document.querySelector('#sal-deletion .js-plotly-plot');"
                 "return !!(g && g.data && g.data.length && h && h.data && h.data.length);")
        t0 = time.time()
        while not driver.execute_script(drawn):
            if time.time() - t0 > 600:
                raise SystemExit("the saliency panel was not drawn within 10 minutes")
            time.sleep(1)
        time.sleep(2)
        panel = driver.find_element("css selector", "#saliency-panel")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center', behavior: 'instant'});", panel)
        time.sleep(1)
        panel.screenshot(args.out)
        print(f"wrote {args.out} (drawn after {time.time() - t0:.0f} s)")
    finally:
        driver.quit()
        server.shutdown()


if __name__ == "__main__":
    main()
