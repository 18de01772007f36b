#!/usr/bin/env bash
# Source at the start of a device-machine command: installs the carried wheels (.whl/,
# made by ../shared/tools/device-wheels.sh) and this checkout, keeps NVLink multicast off.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 FLASHMOE_CACHE=${FLASHMOE_CACHE:-/tmp/flashmoe_cache}
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
