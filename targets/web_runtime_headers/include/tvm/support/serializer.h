/*
 * voxc: minimal stand-in for a TVM header that the apache-tvm wheel does not ship.
 * Serializer specializations for the types the runtime reads: arithmetic values and enums
 * (raw little-endian), DLDataType/DLDevice (field by field), std::string / ffi::String /
 * ffi::Bytes (u64 size + bytes), std::vector / ffi::Array (u64 count + elements),
 * std::pair, and std::map / std::unordered_map / ffi::Map (u64 count + key,value pairs).
 */
#ifndef TVM_SUPPORT_SERIALIZER_H_
#define TVM_SUPPORT_SERIALIZER_H_

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <map>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tvm {
namespace support {

template <typename T>
struct Serializer<T, std::enable_if_t<std::is_arithmetic_v<T>>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const T& v) { s->Write(&v, sizeof(T)); }
  static bool Read(Stream* s, T* v) { return s->Read(v, sizeof(T)) == sizeof(T); }
};

// Enums travel as their underlying integer type.
template <typename T>
struct Serializer<T, std::enable_if_t<std::is_enum_v<T>>> {
  static constexpr bool enabled = true;
  using U = std::underlying_type_t<T>;
  static void Write(Stream* s, const T& v) { Serializer<U>::Write(s, static_cast<U>(v)); }
  static bool Read(Stream* s, T* v) {
    U u;
    if (!Serializer<U>::Read(s, &u)) return false;
    *v = static_cast<T>(u);
    return true;
  }
};

template <>
struct Serializer<DLDataType> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const DLDataType& t) {
    s->Write(t.code);
    s->Write(t.bits);
    s->Write(t.lanes);
  }
  static bool Read(Stream* s, DLDataType* t) {
    return s->Read(&t->code) && s->Read(&t->bits) && s->Read(&t->lanes);
  }
};

template <>
struct Serializer<DLDevice> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const DLDevice& d) {
    s->Write(static_cast<int32_t>(d.device_type));
    s->Write(d.device_id);
  }
  static bool Read(Stream* s, DLDevice* d) {
    int32_t type;
    if (!s->Read(&type) || !s->Read(&d->device_id)) return false;
    d->device_type = static_cast<DLDeviceType>(type);
    return true;
  }
};

namespace detail {
/*! \brief u64 length + raw bytes, the layout shared by all string-like types. */
inline void WriteBytes(Stream* s, const char* data, size_t size) {
  s->Write(static_cast<uint64_t>(size));
  if (size != 0) s->Write(data, size);
}
inline bool ReadBytes(Stream* s, std::string* out) {
  uint64_t size;
  if (!s->Read(&size)) return false;
  out->resize(static_cast<size_t>(size));
  return size == 0 || s->Read(&(*out)[0], out->size()) == out->size();
}
}  // namespace detail

template <>
struct Serializer<std::string> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::string& v) { detail::WriteBytes(s, v.data(), v.size()); }
  static bool Read(Stream* s, std::string* v) { return detail::ReadBytes(s, v); }
};

template <>
struct Serializer<ffi::String> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const ffi::String& v) { detail::WriteBytes(s, v.data(), v.size()); }
  static bool Read(Stream* s, ffi::String* v) {
    std::string tmp;
    if (!detail::ReadBytes(s, &tmp)) return false;
    *v = ffi::String(std::move(tmp));
    return true;
  }
};

template <>
struct Serializer<ffi::Bytes> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const ffi::Bytes& v) { detail::WriteBytes(s, v.data(), v.size()); }
  static bool Read(Stream* s, ffi::Bytes* v) {
    std::string tmp;
    if (!detail::ReadBytes(s, &tmp)) return false;
    *v = ffi::Bytes(std::move(tmp));
    return true;
  }
};

template <typename A, typename B>
struct Serializer<std::pair<A, B>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::pair<A, B>& v) {
    s->Write(v.first);
    s->Write(v.second);
  }
  static bool Read(Stream* s, std::pair<A, B>* v) { return s->Read(&v->first) && s->Read(&v->second); }
};

template <typename T, typename Alloc>
struct Serializer<std::vector<T, Alloc>> {
  static constexpr bool enabled = true;
  // Arithmetic elements are copied as one block (same bytes as element by element).
  static constexpr bool kRaw = std::is_arithmetic_v<T> && !std::is_same_v<T, bool>;
  static void Write(Stream* s, const std::vector<T, Alloc>& v) {
    s->Write(static_cast<uint64_t>(v.size()));
    if constexpr (kRaw) {
      if (!v.empty()) s->Write(v.data(), v.size() * sizeof(T));
    } else {
      for (const T& e : v) s->Write(e);
    }
  }
  static bool Read(Stream* s, std::vector<T, Alloc>* v) {
    uint64_t n;
    if (!s->Read(&n)) return false;
    v->resize(static_cast<size_t>(n));
    if constexpr (kRaw) {
      size_t bytes = v->size() * sizeof(T);
      return bytes == 0 || s->Read(v->data(), bytes) == bytes;
    } else {
      for (T& e : *v) {
        if (!s->Read(&e)) return false;
      }
      return true;
    }
  }
};

template <typename T>
struct Serializer<ffi::Array<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const ffi::Array<T>& v) {
    s->Write(static_cast<uint64_t>(v.size()));
    for (const T& e : v) s->Write(e);
  }
  static bool Read(Stream* s, ffi::Array<T>* v) {
    uint64_t n;
    if (!s->Read(&n)) return false;
    ffi::Array<T> out;
    out.reserve(static_cast<int64_t>(n));
    for (uint64_t i = 0; i < n; ++i) {
      T e;
      if (!s->Read(&e)) return false;
      out.push_back(std::move(e));
    }
    *v = std::move(out);
    return true;
  }
};

namespace detail {
template <typename MapT, typename K, typename V>
struct MapSerializer {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const MapT& m) {
    s->Write(static_cast<uint64_t>(m.size()));
    for (const auto& kv : m) {
      s->Write(static_cast<const K&>(kv.first));
      s->Write(static_cast<const V&>(kv.second));
    }
  }
};
}  // namespace detail

template <typename K, typename V, typename... Rest>
struct Serializer<std::unordered_map<K, V, Rest...>>
    : detail::MapSerializer<std::unordered_map<K, V, Rest...>, K, V> {
  static bool Read(Stream* s, std::unordered_map<K, V, Rest...>* m) {
    uint64_t n;
    if (!s->Read(&n)) return false;
    m->clear();
    for (uint64_t i = 0; i < n; ++i) {
      std::pair<K, V> kv;
      if (!s->Read(&kv)) return false;
      m->emplace(std::move(kv));
    }
    return true;
  }
};

template <typename K, typename V, typename... Rest>
struct Serializer<std::map<K, V, Rest...>> : detail::MapSerializer<std::map<K, V, Rest...>, K, V> {
  static bool Read(Stream* s, std::map<K, V, Rest...>* m) {
    uint64_t n;
    if (!s->Read(&n)) return false;
    m->clear();
    for (uint64_t i = 0; i < n; ++i) {
      std::pair<K, V> kv;
      if (!s->Read(&kv)) return false;
      m->emplace(std::move(kv));
    }
    return true;
  }
};

template <typename K, typename V>
struct Serializer<ffi::Map<K, V>> : detail::MapSerializer<ffi::Map<K, V>, K, V> {
  static bool Read(Stream* s, ffi::Map<K, V>* m) {
    uint64_t n;
    if (!s->Read(&n)) return false;
    ffi::Map<K, V> out;
    for (uint64_t i = 0; i < n; ++i) {
      K k;
      V v;
      if (!s->Read(&k) || !s->Read(&v)) return false;
      out.Set(std::move(k), std::move(v));
    }
    *m = std::move(out);
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_SERIALIZER_H_
