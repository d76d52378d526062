#!/bin/sh
# Make Fashion-MNIST available offline. Uses Debian's dataset-fashion-mnist package where apt can
# be used; otherwise says every other way to provide the four IDX .gz files.
set -eu
DEBIAN_DIR=/usr/share/datasets/fashion-mnist
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"

have_all() {
    for f in $FILES; do [ -f "$1/$f" ] || return 1; done
}

# The library's own search first, where its environment exists (make passes it): every place
# and layout a study looks in (the user cache, torchvision's FashionMNIST/raw/, .gz or not).
# (Only where it imports the package: an environment still being made, or one whose install
# was cut short, says nothing about the data.)
if [ -n "${QERROR_PYTHON:-}" ] && [ -x "$QERROR_PYTHON" ] \
        && "$QERROR_PYTHON" -c 'import qerror.data' >/dev/null 2>&1; then
    search='
import sys
from qerror.data import DataNotFoundError, find_fashion_mnist
try:
    print(find_fashion_mnist())
except DataNotFoundError as err:
    sys.exit(str(err))
'
    if found=$("$QERROR_PYTHON" -c "$search" 2>/dev/null); then
        echo "Fashion-MNIST found in $found"
        exit 0
    fi
    if [ -n "${QERROR_DATA:-}" ]; then
        # a named folder is the only one a study looks in: installing elsewhere would not help
        "$QERROR_PYTHON" -c "$search" >/dev/null
        exit 1
    fi
fi

for dir in "${QERROR_DATA:-}" "${QERROR_DATA:+$QERROR_DATA/fashion-mnist}" "$DEBIAN_DIR"; do
    if [ -n "$dir" ] && have_all "$dir"; then
        echo "Fashion-MNIST found in $dir"
        exit 0
    fi
done

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "Installing Debian's dataset-fashion-mnist (IDX files into $DEBIAN_DIR)"
    apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || {
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    }
    have_all "$DEBIAN_DIR" && exit 0
fi

cat >&2 <<MSG
Fashion-MNIST was not found and could not be installed automatically. Any one of these works:
  * as root on Debian/Ubuntu:  apt-get install dataset-fashion-mnist
  * put the four files ($FILES)
    in a folder and set QERROR_DATA=/that/folder (or pass --data-root to a study)
  * let torchvision download them: python -c "import torchvision; torchvision.datasets.FashionMNIST('$HOME/.cache/qerror/data', download=True)"
MSG
exit 1
