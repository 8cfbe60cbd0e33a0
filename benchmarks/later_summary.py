"""One line per later probe of the `scale.py --repeat` results in $OUT/llama*.json (device round scripts), with the
last probe's memory peak by allocating frames (--memory) and its profile's rows of most own time (--profile N)."""

from __future__ import annotations

import argparse
import glob
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--profile", type=int, default=0)
    a = ap.parse_args()
    for f in sorted(glob.glob(os.environ["OUT"] + "/llama*.json")):
        try:
            r = json.load(open(f))["results"][0]
        except Exception:  # noqa: BLE001 - a case a time limit cut leaves no results
            continue
        for lp in r.get("later_probes", []):
            m = lp["metrics"].get("spectrum")
            if m is None:
                print(f.split("/")[-1], "later: no spectrum", str(lp.get("errors"))[:300])
                continue
            print(f.split("/")[-1], "later", round(lp["probe_seconds"], 1), "hvp", round(lp["probe_hvp_seconds"], 1),
                  "outside", round(m["outside_seconds"], 2), round(m["outside_share"], 3), "peak_mib", lp["peak_mib"],
                  "pinned", lp.get("pinned"))
        h = r.get("memory_at_peak")
        if a.memory and h:
            print("peak above start GiB", round(h["peak_above_start_bytes"] / 2**30, 3), "start GiB",
                  round(h["start_bytes"] / 2**30, 3))
            for row in h["at_peak"][:14]:
                print(f'  {row["bytes"] / 2**30:7.3f} GiB {row["blocks"]:5d}  {row["where"][:230]}')
            for row in h.get("peaks_by_allocation", []):
                print(f'  phase peak {row["bytes"] / 2**30:7.3f} GiB  {row["where"][:200]}')
        for row in (r.get("later_profile") or {}).get("by_own", [])[: a.profile]:
            print(f'  own {row["own_s"]:7.3f} cum {row["cumulative_s"]:7.3f} {row["calls"]:6d} {row["function"][:90]}')


if __name__ == "__main__":
    main()
