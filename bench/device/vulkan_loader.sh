# The Vulkan loader (libvulkan.so.1) for the GPU machine, which has NVIDIA's Vulkan driver (its ICD
# json under /usr/share/vulkan/icd.d or /usr/local/nvidia/share/vulkan/icd.d) but no loader and no
# network: Debian's packages travel with the pack and are unpacked there.  Sourced by pack.sh,
# setup.sh, run_bench.sh and webgpu_bench.sh:
#   vulkan_loader_fetch DIR     here: put the packages' .debs into DIR (downloaded once into a cache)
#   vulkan_loader_install DIR   there: unpack each of DIR's .debs into / unless its library is installed
#   vulkan_loader_env           there: point the loader at NVIDIA's ICD where it is not on the default path

# package:library it provides.  NVIDIA's ICD library (libGLX_nvidia.so.0) loads the glvnd libraries
# besides the driver's own files: with the loader and libglvnd0 alone, wgpu found no Vulkan adapter on
# the H100 machine ("vulkan drivers/libraries could not be loaded"), and Dawn none without the EGL/GL ones.
VULKAN_LOADER_PACKAGES="libvulkan1:libvulkan.so.1 libglvnd0:libGLdispatch.so.0 libegl1:libEGL.so.1 \
libopengl0:libOpenGL.so.0 libgl1:libGL.so.1 libglx0:libGLX.so.0 libgles2:libGLESv2.so.2"

vulkan_loader_fetch() {   # $1: destination folder
  local cache="${VOXC_CACHE_DIR:-$HOME/.cache/voxc}/debs-amd64" entry package
  mkdir -p "$1" "$cache"
  for entry in $VULKAN_LOADER_PACKAGES; do
    package=${entry%%:*}
    if [ -z "$(ls "$cache/${package}"_*_amd64.deb 2>/dev/null)" ]; then
      # amd64 package lists of their own (in /tmp/amd64), whatever this machine's architecture and lists
      local o="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64"
      mkdir -p /tmp/amd64/partial
      [ -n "$(ls /tmp/amd64/*Packages* 2>/dev/null)" ] || apt-get $o update >/dev/null
      (cd "$cache" && apt-get $o download "$package" >/dev/null 2>&1)
    fi
    cp "$cache/${package}"_*_amd64.deb "$1/"
  done
}

vulkan_loader_install() {   # $1: folder of .debs
  local entry deb unpacked=0 installed
  installed=$(ldconfig -p 2>/dev/null || true)   # read whole: `ldconfig -p | grep -q` fails under pipefail
  for entry in $VULKAN_LOADER_PACKAGES; do
    grep -q "${entry#*:} " <<< "$installed" && continue
    for deb in "$1/${entry%%:*}"_*.deb; do
      [ -f "$deb" ] && dpkg -x "$deb" / && unpacked=1
    done
  done
  [ "$unpacked" = 0 ] || ldconfig
}

vulkan_loader_report() {   # what the loader will find: the ICDs and any library their driver lacks
  local icd lib path
  for icd in ${VK_DRIVER_FILES:-} /usr/share/vulkan/icd.d/*.json /usr/local/nvidia/share/vulkan/icd.d/*.json \
             /etc/vulkan/icd.d/*.json; do
    [ -f "$icd" ] || continue
    lib=$(grep -o '"library_path"[^,]*' "$icd" | sed 's/.*: *"\(.*\)"/\1/')
    path=$lib
    [ "${lib#/}" != "$lib" ] || path=$(ldconfig -p | grep -o "^[[:space:]]*$lib .*=> .*" | sed -n 1p | sed 's/.*=> //')
    echo "vulkan ICD $icd -> ${path:-$lib (not found)}$( [ -z "$path" ] || ldd "$path" 2>&1 | grep 'not found' | tr -s ' \t\n' ' ')"
  done
}

vulkan_loader_env() {
  if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  fi
  export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
}
