/*
 * voxc: minimal stand-in for a TVM header that the apache-tvm wheel does not ship.
 * Written for voxc from how the wheel's runtime sources use it; only what the web runtime
 * (the .cc files in web/emcc) needs. The byte format matches what libtvm_compiler.so writes (checked by
 * voxc's tests): little-endian PODs, u64 length prefixes for strings and containers.
 */
#ifndef TVM_SUPPORT_IO_H_
#define TVM_SUPPORT_IO_H_

#include <cstddef>
#include <cstdint>

namespace tvm {
namespace support {

// Both wasm32 and x86-64 are little-endian; the wire format is little-endian, so no byte swapping.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "voxc web runtime assumes a little-endian host");

/*! \brief How a type is written to / read from a Stream; specialized in serializer.h and by users. */
template <typename T, typename = void>
struct Serializer {
  static constexpr bool enabled = false;
};

/*! \brief A byte stream; subclasses provide raw Read/Write, typed access goes through Serializer. */
class Stream {
 public:
  virtual ~Stream() = default;
  /*! \return the number of bytes read (less than size at the end of the data). */
  virtual size_t Read(void* ptr, size_t size) = 0;
  /*! \return the number of bytes written. */
  virtual size_t Write(const void* ptr, size_t size) = 0;

  template <typename T>
  void Write(const T& value) {
    static_assert(Serializer<T>::enabled, "no Serializer for this type");
    Serializer<T>::Write(this, value);
  }
  template <typename T>
  bool Read(T* out) {
    static_assert(Serializer<T>::enabled, "no Serializer for this type");
    return Serializer<T>::Read(this, out);
  }
  template <typename T>
  void WriteArray(const T* data, size_t num) {
    for (size_t i = 0; i < num; ++i) this->Write<T>(data[i]);
  }
  template <typename T>
  bool ReadArray(T* data, size_t num) {
    for (size_t i = 0; i < num; ++i) {
      if (!this->Read<T>(data + i)) return false;
    }
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#include <tvm/support/serializer.h>

#endif  // TVM_SUPPORT_IO_H_
