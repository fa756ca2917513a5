/*
 * voxc: minimal stand-in for a TVM header that the apache-tvm wheel does not ship.
 * A bump allocator for short-lived RPC scratch memory, released all at once.
 */
#ifndef TVM_SUPPORT_ARENA_H_
#define TVM_SUPPORT_ARENA_H_

#include <cstddef>
#include <memory>
#include <type_traits>
#include <vector>

namespace tvm {
namespace support {

class Arena {
 public:
  /*! \brief Uninitialized storage for `count` trivial objects of type T. */
  template <typename T>
  T* allocate_(int count) {
    static_assert(std::is_trivial_v<T>, "Arena only holds trivial types");
    return static_cast<T*>(Alloc(sizeof(T) * static_cast<size_t>(count < 0 ? 0 : count), alignof(T)));
  }
  /*! \brief Frees every allocation; keeps one page so the next round reuses it. */
  void RecycleAll() {
    if (pages_.size() > 1) {
      pages_.erase(pages_.begin(), pages_.end() - 1);
    }
    used_ = 0;
  }

 private:
  static constexpr size_t kPageSize = 16 << 10;
  struct Page {
    std::unique_ptr<std::max_align_t[]> mem;
    size_t size;
  };

  void* Alloc(size_t bytes, size_t align) {
    if (align < alignof(std::max_align_t)) align = alignof(std::max_align_t);
    size_t offset = (used_ + align - 1) / align * align;
    if (pages_.empty() || offset + bytes > pages_.back().size) {
      size_t size = bytes > kPageSize ? bytes : kPageSize;
      size_t n = (size + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
      pages_.push_back(Page{std::unique_ptr<std::max_align_t[]>(new std::max_align_t[n]),
                            n * sizeof(std::max_align_t)});
      offset = 0;
    }
    used_ = offset + bytes;
    return reinterpret_cast<char*>(pages_.back().mem.get()) + offset;
  }

  std::vector<Page> pages_;
  size_t used_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_ARENA_H_
