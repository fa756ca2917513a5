/*
 * voxc: minimal stand-in for a TVM header that the apache-tvm wheel does not ship.
 * A FIFO byte queue for the RPC endpoint. The readable bytes are kept contiguous (compacted
 * on demand) so callbacks always see one span; RPC traffic is small, so the memmove is cheap.
 */
#ifndef TVM_SUPPORT_RING_BUFFER_H_
#define TVM_SUPPORT_RING_BUFFER_H_

#include <tvm/ffi/error.h>

#include <cstring>
#include <vector>

namespace tvm {
namespace support {

class RingBuffer {
 public:
  size_t bytes_available() const { return size_; }

  /*! \brief Make room for at least n readable-plus-writable bytes in total. */
  void Reserve(size_t n) { EnsureTail(n > size_ ? n - size_ : 0); }

  void Read(void* data, size_t size) {
    TVM_FFI_ICHECK_LE(size, size_);
    std::memcpy(data, buf_.data() + head_, size);
    Consume(size);
  }

  void Write(const void* data, size_t size) {
    EnsureTail(size);
    std::memcpy(buf_.data() + head_ + size_, data, size);
    size_ += size;
  }

  /*! \brief Hand up to max_nbytes readable bytes to frecv(const void*, size_t) -> bytes taken. */
  template <typename F>
  size_t ReadWithCallback(F frecv, size_t max_nbytes) {
    size_t n = max_nbytes < size_ ? max_nbytes : size_;
    size_t taken = frecv(static_cast<const void*>(buf_.data() + head_), n);
    TVM_FFI_ICHECK_LE(taken, n);
    Consume(taken);
    return taken;
  }

  /*! \brief Let fsend(void*, size_t) -> bytes filled append up to max_nbytes. */
  template <typename F>
  size_t WriteWithCallback(F fsend, size_t max_nbytes) {
    EnsureTail(max_nbytes);
    size_t filled = fsend(static_cast<void*>(buf_.data() + head_ + size_), max_nbytes);
    TVM_FFI_ICHECK_LE(filled, max_nbytes);
    size_ += filled;
    return filled;
  }

 private:
  void Consume(size_t n) {
    head_ += n;
    size_ -= n;
    if (size_ == 0) head_ = 0;
  }
  // Guarantees n writable bytes after the readable span.
  void EnsureTail(size_t n) {
    if (head_ + size_ + n <= buf_.size()) return;
    if (head_ != 0) {
      std::memmove(buf_.data(), buf_.data() + head_, size_);
      head_ = 0;
    }
    if (size_ + n > buf_.size()) {
      size_t cap = buf_.empty() ? 1024 : buf_.size();
      while (cap < size_ + n) cap *= 2;
      buf_.resize(cap);
    }
  }

  std::vector<char> buf_;
  size_t head_ = 0;
  size_t size_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_RING_BUFFER_H_
