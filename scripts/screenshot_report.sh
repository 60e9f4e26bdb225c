#!/usr/bin/env bash
# Screenshot a jaxlin report in headless Chromium, to check by eye that it reads well (docs/results-schema.md, "The report").
# Usage: scripts/screenshot_report.sh REPORT.html OUT.png [WIDTHxHEIGHT]   (default 1280x4000 CSS pixels)
# Not part of CI: it needs a Chromium binary (Debian: apt-get install -y chromium-headless-shell, or chromium).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTHxHEIGHT]" >&2; exit 2
fi
report=$1 out=$2 size=${3:-1280x4000}
if [[ ! -f $report ]]; then
  echo "error: $report is not a file; pass the report.html of a 'jaxlin run' output directory" >&2; exit 2
fi
browser=""
for name in chromium chromium-headless-shell chromium-browser google-chrome google-chrome-stable; do
  if command -v "$name" >/dev/null 2>&1; then browser=$(command -v "$name"); break; fi
done
if [[ -z $browser ]]; then
  echo "error: no Chromium found (tried chromium, chromium-headless-shell, chromium-browser, google-chrome); install one, e.g." \
       "'apt-get install -y chromium-headless-shell' on Debian, then rerun" >&2
  exit 3
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size="${size/x/,}" --screenshot="$(realpath -m "$out")" "file://$(realpath "$report")" >/dev/null 2>&1
if [[ ! -s $out ]]; then
  echo "error: $browser wrote no screenshot to $out" >&2; exit 1
fi
echo "wrote $out ($size) from $report"
