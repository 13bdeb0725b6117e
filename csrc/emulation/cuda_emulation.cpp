// The runtime of the CUDA emulation (see cuda_emulation.h): a pool of OS threads that
// runs the threads of one block at a time, concurrently, with a real barrier.
#include "cuda_emulation.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <thread>

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace resattn {
namespace emu {
namespace {

constexpr unsigned int kMaxThreadsPerBlock = 1024;
constexpr std::size_t kMaxDynamicSharedBytes = 48 * 1024;  // without cudaFuncSetAttribute opt-in
constexpr unsigned char kSharedPoison = 0xFF;
constexpr std::size_t kMaxLogged = 4096;  // the launch log keeps the most recent launches

// A reusable barrier whose party shrinks when a thread returns from the kernel.
class Barrier {
 public:
  void reset(int parties) {
    std::lock_guard<std::mutex> lock(mu_);
    parties_ = parties;
    arrived_ = 0;
  }

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const std::uint64_t phase = phase_;
    if (++arrived_ >= parties_) {
      release();
      return;
    }
    cv_.wait(lock, [&] { return phase_ != phase; });
  }

  // A thread that returned: the others no longer wait for it.
  void drop() {
    std::lock_guard<std::mutex> lock(mu_);
    --parties_;
    if (parties_ > 0 && arrived_ >= parties_) release();
  }

 private:
  void release() {  // mu_ held
    arrived_ = 0;
    ++phase_;
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  int parties_ = 0;
  int arrived_ = 0;
  std::uint64_t phase_ = 0;
};

struct Block {
  const std::function<void()>* body = nullptr;
  dim3 grid, block, index;
  unsigned char* shared = nullptr;
  Barrier barrier;
};

thread_local Block* current_block = nullptr;

// Persistent workers; worker t runs thread t (linear index) of every block.
class Pool {
 public:
  // Runs the threads of `block` and returns when all have returned; the first exception a
  // thread threw is rethrown here.
  void run(Block& block, int threads) {
    while (static_cast<int>(workers_.size()) < threads) {
      const int id = static_cast<int>(workers_.size());
      const std::uint64_t now = generation_;  // only this (launching) thread changes it
      workers_.emplace_back([this, id, now] { work(id, now); });
    }
    block.barrier.reset(threads);
    std::unique_lock<std::mutex> lock(mu_);
    block_ = &block;
    active_ = threads;
    remaining_ = threads;
    error_ = nullptr;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    block_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work(int id, std::uint64_t seen) {
    for (;;) {
      Block* block;
      {
        std::unique_lock<std::mutex> lock(mu_);
        start_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= active_) continue;
        block = block_;
      }
      const unsigned int bx = block->block.x, by = block->block.y;
      const unsigned int t = static_cast<unsigned int>(id);
      threadIdx = dim3(t % bx, (t / bx) % by, t / (bx * by));
      blockIdx = block->index;
      blockDim = block->block;
      gridDim = block->grid;
      current_block = block;
      std::exception_ptr error;
      try {
        (*block->body)();
      } catch (...) {
        error = std::current_exception();
      }
      block->barrier.drop();
      current_block = nullptr;
      std::lock_guard<std::mutex> lock(mu_);
      if (error && !error_) error_ = error;
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable start_, done_;
  std::uint64_t generation_ = 0;
  Block* block_ = nullptr;
  int active_ = 0;
  int remaining_ = 0;
  std::exception_ptr error_;
};

struct SharedDeleter {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(16)); }
};

std::mutex& launch_mutex() {  // one launch at a time: a single, synchronous stream
  static std::mutex mu;
  return mu;
}

Pool& pool() {
  // Never destroyed: the workers wait for work until the process exits.
  static Pool* p = new Pool();
  return *p;
}

std::mutex log_mutex;
std::vector<LaunchRecord> log;
thread_local std::string last_error;

}  // namespace

Options& options() {
  static Options opts;
  return opts;
}

std::vector<LaunchRecord> launches() {
  std::lock_guard<std::mutex> lock(log_mutex);
  return log;
}

void clear_launches() {
  std::lock_guard<std::mutex> lock(log_mutex);
  log.clear();
}

unsigned char* dynamic_shared_memory() {
  TORCH_CHECK(current_block != nullptr, "resattn_fast emulation: shared memory outside a kernel");
  return current_block->shared;
}

void check_last_launch() {
  if (last_error.empty()) return;
  const std::string error = last_error;
  last_error.clear();
  TORCH_CHECK(false, "resattn_fast emulated CUDA launch failed: ", error);
}

std::string tidy_kernel_name(const char* pretty_function) {
  std::string s(pretty_function);
  // GCC: "... [with auto Kernel = ns::kernel<float, int, 4>; ...]"; Clang: "[Kernel = &ns::kernel<...>]"
  std::size_t start = s.find("Kernel = ");
  if (start == std::string::npos) return s;
  start += 9;
  if (start < s.size() && s[start] == '&') ++start;
  std::size_t end = s.find_first_of(";]", start);
  std::string name = s.substr(start, end == std::string::npos ? std::string::npos : end - start);
  // Drop the namespaces in front of the kernel's own name (never inside its template arguments).
  const std::size_t open = name.find('<');
  const std::size_t sep = name.rfind("::", open);
  if (sep != std::string::npos) name = name.substr(sep + 2);
  return name;
}

void run_grid(const char* kernel, dim3 grid, dim3 block, std::size_t shared_bytes,
              const std::function<void()>& thread_body) {
  const std::uint64_t threads = static_cast<std::uint64_t>(block.x) * block.y * block.z;
  const std::uint64_t blocks = static_cast<std::uint64_t>(grid.x) * grid.y * grid.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || blocks == 0 || grid.x > 2147483647u ||
      grid.y > 65535u || grid.z > 65535u) {
    last_error = std::string("invalid configuration argument (") + kernel + ": grid " +
                 std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z) +
                 ", block " + std::to_string(block.x) + "x" + std::to_string(block.y) + "x" +
                 std::to_string(block.z) + ")";
    return;
  }
  if (shared_bytes > kMaxDynamicSharedBytes) {
    last_error = std::string("too much dynamic shared memory requested (") + kernel + ": " +
                 std::to_string(shared_bytes) + " bytes > 48 KiB)";
    return;
  }
  if (options().record_launches) {
    std::lock_guard<std::mutex> lock(log_mutex);
    if (log.size() >= kMaxLogged) log.erase(log.begin(), log.begin() + kMaxLogged / 2);
    log.push_back({kernel, grid, block, shared_bytes});
  }
  std::lock_guard<std::mutex> lock(launch_mutex());
  Block b;
  b.body = &thread_body;
  b.grid = grid;
  b.block = block;
  // Blocks run in reverse order: a kernel must not depend on the order of its blocks.
  for (std::uint64_t linear = blocks; linear-- > 0;) {
    b.index = dim3(static_cast<unsigned int>(linear % grid.x),
                   static_cast<unsigned int>((linear / grid.x) % grid.y),
                   static_cast<unsigned int>(linear / (static_cast<std::uint64_t>(grid.x) * grid.y)));
    std::unique_ptr<unsigned char[], SharedDeleter> shared;
    if (shared_bytes > 0) {
      shared.reset(static_cast<unsigned char*>(::operator new[](shared_bytes, std::align_val_t(16))));
      std::fill(shared.get(), shared.get() + shared_bytes, kSharedPoison);
    }
    b.shared = shared.get();
    pool().run(b, static_cast<int>(threads));
  }
}

}  // namespace emu
}  // namespace resattn

void __syncthreads() {
  resattn::emu::Block* block = resattn::emu::current_block;
  TORCH_CHECK(block != nullptr, "resattn_fast emulation: __syncthreads() outside a kernel");
  block->barrier.arrive_and_wait();
}
