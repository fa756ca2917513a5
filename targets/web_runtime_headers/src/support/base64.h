/*
 * voxc: minimal stand-in for a TVM header that the apache-tvm wheel does not ship.
 * Streaming base64 (standard alphabet, '=' padding) on top of another Stream; used for
 * tensors embedded in JSON.
 */
#ifndef TVM_SUPPORT_BASE64_H_
#define TVM_SUPPORT_BASE64_H_

#include <tvm/ffi/error.h>
#include <tvm/support/io.h>

#include <cstdint>

namespace tvm {
namespace support {

namespace base64 {
inline const char* Alphabet() {
  return "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}
/*! \return 0..63 for an alphabet char, -1 for '=', -2 for anything else. */
inline int Decode(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  if (c == '=') return -1;
  return -2;
}
}  // namespace base64

/*! \brief Encodes everything written into base64 text on `sink`; call Finish() at the end. */
class Base64OutStream : public Stream {
 public:
  explicit Base64OutStream(Stream* sink) : sink_(sink) {}

  using Stream::Read;
  using Stream::Write;

  size_t Write(const void* ptr, size_t size) final {
    const unsigned char* p = static_cast<const unsigned char*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      pending_[npending_++] = p[i];
      if (npending_ == 3) EmitGroup();
    }
    return size;
  }
  size_t Read(void*, size_t) final {
    TVM_FFI_THROW(InternalError) << "Base64OutStream is write-only";
    return 0;
  }
  /*! \brief Flush the last partial group with '=' padding. */
  void Finish() {
    if (npending_ != 0) EmitGroup();
  }

 private:
  void EmitGroup() {
    const char* a = base64::Alphabet();
    uint32_t v = (uint32_t(pending_[0]) << 16) | (npending_ > 1 ? uint32_t(pending_[1]) << 8 : 0) |
                 (npending_ > 2 ? uint32_t(pending_[2]) : 0);
    char out[4] = {a[(v >> 18) & 63], a[(v >> 12) & 63], npending_ > 1 ? a[(v >> 6) & 63] : '=',
                   npending_ > 2 ? a[v & 63] : '='};
    sink_->Write(out, 4);
    npending_ = 0;
  }

  Stream* sink_;
  unsigned char pending_[3] = {0, 0, 0};
  int npending_ = 0;
};

/*! \brief Decodes base64 text read from `source`; whitespace between characters is ignored. */
class Base64InStream : public Stream {
 public:
  explicit Base64InStream(Stream* source) : source_(source) {}

  using Stream::Read;
  using Stream::Write;

  /*! \brief Reset the decoder before the first Read (kept for API compatibility). */
  void InitPosition() {
    nbuf_ = pos_ = 0;
    done_ = false;
  }

  size_t Read(void* ptr, size_t size) final {
    unsigned char* out = static_cast<unsigned char*>(ptr);
    size_t n = 0;
    while (n < size) {
      if (pos_ == nbuf_ && !Refill()) break;
      out[n++] = buf_[pos_++];
    }
    return n;
  }
  size_t Write(const void*, size_t) final {
    TVM_FFI_THROW(InternalError) << "Base64InStream is read-only";
    return 0;
  }

 private:
  bool NextChar(char* c) {
    while (source_->Read(c, 1) == 1) {
      if (*c != ' ' && *c != '\n' && *c != '\r' && *c != '\t') return true;
    }
    return false;
  }
  // Decodes one 4-character group into buf_.
  bool Refill() {
    if (done_) return false;
    int vals[4];
    for (int i = 0; i < 4; ++i) {
      char c;
      if (!NextChar(&c)) {
        TVM_FFI_ICHECK_EQ(i, 0) << "truncated base64 input";
        done_ = true;
        return false;
      }
      vals[i] = base64::Decode(c);
      TVM_FFI_ICHECK_NE(vals[i], -2) << "invalid base64 character";
    }
    TVM_FFI_ICHECK(vals[0] >= 0 && vals[1] >= 0) << "invalid base64 padding";
    uint32_t v = (uint32_t(vals[0]) << 18) | (uint32_t(vals[1]) << 12) |
                 (vals[2] >= 0 ? uint32_t(vals[2]) << 6 : 0) | (vals[3] >= 0 ? uint32_t(vals[3]) : 0);
    buf_[0] = static_cast<unsigned char>(v >> 16);
    buf_[1] = static_cast<unsigned char>(v >> 8);
    buf_[2] = static_cast<unsigned char>(v);
    nbuf_ = vals[2] < 0 ? 1 : (vals[3] < 0 ? 2 : 3);
    pos_ = 0;
    if (nbuf_ < 3) done_ = true;  // padding ends the data
    return true;
  }

  Stream* source_;
  unsigned char buf_[3];
  int nbuf_ = 0, pos_ = 0;
  bool done_ = false;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_BASE64_H_
