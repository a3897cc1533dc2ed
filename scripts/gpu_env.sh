# Sourced by the one-shot GPU scripts (benchmark_gpu.sh, train_tiny_priors_gpu.sh): makes diffusers
# importable on a lent GPU machine that lacks it, from wheels carried in .whl/ (download them here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# and pass carry=[".whl"] to the device tool), and puts the repository on PYTHONPATH.
export PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
