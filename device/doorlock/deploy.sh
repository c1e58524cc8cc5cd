#!/usr/bin/env bash
# Deploy the door lock to a Raspberry Pi:   make deploy PI=user@host   (or: device/doorlock/deploy.sh user@host)
#
# Copies the device package and the face bundle over ssh/rsync, creates /opt/doorlock/.venv with
# --system-site-packages (so Raspberry Pi OS's python3-picamera2 is importable), installs `.[device]`
# (LiteRT + OpenCV + gpiozero; never TensorFlow — checked below), installs the config (only if none
# exists yet) and the systemd unit, then (re)starts the service. Needs sudo rights on the Pi.
set -euo pipefail

PI="${1:?usage: $0 user@host}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BUNDLE="${BUNDLE:-models/face-resnet}"   # BUNDLE=models/face for the lighter student (set [model] bundle to match)
STAGE="doorlock-staging"

cd "$ROOT"
[ -f "$BUNDLE/manifest.json" ] || { echo "no face bundle at $ROOT/$BUNDLE (build it first)" >&2; exit 2; }

echo "==> copying device package and $BUNDLE to $PI:~/$STAGE"
ssh "$PI" "rm -rf ~/$STAGE/models && mkdir -p ~/$STAGE/models"   # only the bundle deployed now: no stale one lingers
rsync -az --delete --exclude '__pycache__' device pyproject.toml README.md "$PI:~/$STAGE/"
rsync -az --delete "$BUNDLE/" "$PI:~/$STAGE/models/$(basename "$BUNDLE")/"

echo "==> installing on $PI"
ssh "$PI" STAGE="$STAGE" bash -s <<'REMOTE'
set -euo pipefail
# stdin is this script, so sudo cannot ask for a password: fail clearly instead of hanging/garbling
sudo -n true 2>/dev/null || { echo "error: $(id -un)@$(hostname) needs passwordless sudo" >&2; exit 1; }
sudo apt-get update -qq
sudo apt-get install -y --no-install-recommends python3-venv rsync >/dev/null
# Raspberry Pi OS only: on other Debians these do not exist, so warn instead of failing the deploy
sudo apt-get install -y --no-install-recommends python3-lgpio >/dev/null || \
    echo "warning: apt could not install python3-lgpio (not Raspberry Pi OS?); the relay needs a GPIO pin library ([relay] mock = true for a dry run)"
sudo apt-get install -y --no-install-recommends python3-picamera2 >/dev/null || \
    echo "warning: apt could not install python3-picamera2 (not Raspberry Pi OS?); USB/RTSP cameras still work"
id doorlock >/dev/null 2>&1 || sudo useradd --system --home /opt/doorlock --shell /usr/sbin/nologin doorlock
for g in video gpio; do getent group "$g" >/dev/null && sudo usermod -aG "$g" doorlock; done
sudo mkdir -p /opt/doorlock /etc/doorlock /var/lib/doorlock
# An existing config must name the bundle this deploy ships (the default changed from models/face to
# models/face-resnet in session 7): check before /opt is touched, so a running service keeps its files.
if [ -f /etc/doorlock/doorlock.toml ]; then
    configured="$(sed -n 's/^[[:space:]]*bundle[[:space:]]*=[[:space:]]*["'"'"']\([^"'"'"']*\)["'"'"'].*/\1/p' /etc/doorlock/doorlock.toml | head -n 1)"
    case "$configured" in
        /opt/doorlock/models/*)
            if [ ! -f "$HOME/$STAGE/models/$(basename "$configured")/manifest.json" ]; then
                shipped="$(ls "$HOME/$STAGE/models")"
                echo "error: /etc/doorlock/doorlock.toml uses [model] bundle = \"$configured\", but this deploy ships" \
                     "models/$shipped. Set bundle = \"/opt/doorlock/models/$shipped\" there (enrolled people are" \
                     "re-embedded from their stored crops on the next start), or deploy with BUNDLE=models/$(basename "$configured")." >&2
                exit 1
            fi ;;
    esac
fi
sudo rsync -a --delete --exclude .venv "$HOME/$STAGE/" /opt/doorlock/
[ -d /opt/doorlock/.venv ] || sudo python3 -m venv --system-site-packages /opt/doorlock/.venv
sudo /opt/doorlock/.venv/bin/pip install --quiet --upgrade pip
sudo /opt/doorlock/.venv/bin/pip install --quiet '/opt/doorlock[device]'
if sudo /opt/doorlock/.venv/bin/pip list --local 2>/dev/null | grep -iqE '^(tensorflow[-_a-z]*|keras|tf[-_]keras) '; then
    echo "error: TensorFlow or Keras ended up in the device venv; .[device] must not pull it" >&2; exit 1
fi
[ -f /etc/doorlock/doorlock.toml ] || sudo cp /opt/doorlock/device/doorlock/example.toml /etc/doorlock/doorlock.toml
sudo chown -R doorlock:doorlock /var/lib/doorlock
sudo DOORLOCK_CONFIG=/etc/doorlock/doorlock.toml /opt/doorlock/.venv/bin/doorlock check-config >/dev/null
sudo mkdir -p /etc/systemd/system
sudo cp /opt/doorlock/device/doorlock/doorlock.service /etc/systemd/system/doorlock.service
# No systemd running (a container, a chroot): everything is installed, only the service is not started
if [ ! -d /run/systemd/system ]; then
    echo "warning: systemd is not running on $(hostname); installed /etc/systemd/system/doorlock.service but did not start it."
    echo "         Start it by hand:  sudo -u doorlock DOORLOCK_CONFIG=/etc/doorlock/doorlock.toml /opt/doorlock/.venv/bin/doorlock run"
    exit 0
fi
sudo systemctl daemon-reload
sudo systemctl enable doorlock >/dev/null
sudo systemctl restart doorlock
sleep 3
systemctl --no-pager --lines 5 status doorlock || true
REMOTE
echo "==> done. Enroll people on the Pi:  sudo -u doorlock DOORLOCK_CONFIG=/etc/doorlock/doorlock.toml /opt/doorlock/.venv/bin/doorlock enroll NAME --camera"
