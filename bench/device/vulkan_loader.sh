# The Vulkan loader (libvulkan.so.1) for the GPU machine, which has NVIDIA's Vulkan driver (its ICD
# json under /usr/share/vulkan/icd.d or /usr/local/nvidia/share/vulkan/icd.d) but no loader and no
# network: Debian's libvulkan1 .deb travels with the pack and is unpacked there.  Sourced by
# pack.sh, setup.sh, run_bench.sh and webgpu_bench.sh:
#   vulkan_loader_fetch DIR     here: put libvulkan1_*.deb into DIR (downloaded once into a cache)
#   vulkan_loader_install DIR   there: unpack DIR's .debs into / unless a loader is already installed
#   vulkan_loader_env           there: point the loader at NVIDIA's ICD where it is not on the default path

vulkan_loader_fetch() {   # $1: destination folder
  local cache="${VOXC_CACHE_DIR:-$HOME/.cache/voxc}/debs-amd64"
  if [ -z "$(ls "$cache"/libvulkan1_*_amd64.deb 2>/dev/null)" ]; then
    # amd64 package lists of their own (in /tmp/amd64), whatever this machine's architecture and lists
    local o="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64"
    mkdir -p /tmp/amd64/partial "$cache"
    [ -n "$(ls /tmp/amd64/*Packages* 2>/dev/null)" ] || apt-get $o update >/dev/null
    (cd "$cache" && apt-get $o download libvulkan1 >/dev/null 2>&1)
  fi
  mkdir -p "$1" && cp "$cache"/libvulkan1_*_amd64.deb "$1/"
}

vulkan_loader_install() {   # $1: folder of .debs
  if ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1 '; then return 0; fi
  local deb
  for deb in "$1"/*.deb; do
    [ -f "$deb" ] || continue
    dpkg -x "$deb" /
  done
  ldconfig
}

vulkan_loader_env() {
  if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  fi
  export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
}
