// resattn_fast._C_cuda_emulated: the CUDA kernels of kernels/*.cu compiled by the host
// compiler against the emulation of CUDA's execution model (cuda_emulation.h), registered
// for CPU tensors as torch.ops.resattn_fast_emulated.<op> (the schemas of resattn_fast),
// plus the emulation's controls for tests. Built only with RESATTN_BUILD_CUDA_EMULATION=1.
#include <torch/extension.h>
#include <torch/library.h>

#include "cuda_common.cuh"
#include "cuda_emulation.h"
#include "schemas.h"

TORCH_LIBRARY(resattn_fast_emulated, m) { resattn::define_schemas(m); }

namespace resattn {
namespace emu_selftest {
at::Tensor shared_exchange(int64_t blocks, int64_t threads, bool barrier);
at::Tensor out_of_bounds_write(int64_t n);
at::Tensor misaligned_vector_read(int64_t nvec);
at::Tensor warp_shuffle(int64_t blocks, int64_t threads);
at::Tensor divergent_shuffle();
}  // namespace emu_selftest
}  // namespace resattn

namespace {

namespace emu = resattn::emu;

py::dict get_options() {
  const emu::Options& o = emu::options();
  py::dict d;
  d["multiprocessors"] = o.multiprocessors;
  d["threads_per_multiprocessor"] = o.threads_per_multiprocessor;
  d["force_int64_index"] = o.force_int64_index;
  d["force_in_thread_tables"] = o.force_in_thread_tables;
  d["record_launches"] = o.record_launches;
  return d;
}

void set_options(const py::dict& d) {
  emu::Options o = emu::options();
  for (const auto& item : d) {
    const std::string key = py::cast<std::string>(item.first);
    if (key == "multiprocessors") {
      o.multiprocessors = py::cast<int>(item.second);
    } else if (key == "threads_per_multiprocessor") {
      o.threads_per_multiprocessor = py::cast<int>(item.second);
    } else if (key == "force_int64_index") {
      o.force_int64_index = py::cast<bool>(item.second);
    } else if (key == "force_in_thread_tables") {
      o.force_in_thread_tables = py::cast<bool>(item.second);
    } else if (key == "record_launches") {
      o.record_launches = py::cast<bool>(item.second);
    } else {
      throw py::key_error("unknown emulation option '" + key + "'");
    }
  }
  TORCH_CHECK(o.multiprocessors >= 1 && o.threads_per_multiprocessor >= 32,
              "emulated device: multiprocessors >= 1 and threads_per_multiprocessor >= 32");
  emu::options() = o;
}

py::list launches() {
  py::list out;
  for (const emu::LaunchRecord& r : emu::launches()) {
    py::dict d;
    d["kernel"] = r.kernel;
    d["grid"] = py::make_tuple(r.grid.x, r.grid.y, r.grid.z);
    d["block"] = py::make_tuple(r.block.x, r.block.y, r.block.z);
    d["shared_bytes"] = r.shared_bytes;
    out.append(d);
  }
  return out;
}

py::dict build_info() {
  py::dict info;
#if defined(__SANITIZE_ADDRESS__)
  info["sanitizer"] = "address";
#elif defined(__SANITIZE_THREAD__)
  info["sanitizer"] = "thread";
#else
  info["sanitizer"] = "";
#endif
  info["torch_version"] = std::string(TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resattn_fast CUDA kernels under an emulation of CUDA's execution model (CPU tensors)";
  m.def("build_info", &build_info, "What this build of the emulated module contains.");
  m.def("get_options", &get_options, "The emulated device and the test switches.");
  m.def("set_options", &set_options, "Change the emulated device or the test switches.");
  m.def("launches", &launches, "Every launch recorded since clear_launches().");
  m.def("clear_launches", &emu::clear_launches, "Forget the recorded launches.");
  m.def("selftest_shared_exchange", &resattn::emu_selftest::shared_exchange,
        "Shared-memory exchange between threads, with or without the barrier it needs.");
  m.def("selftest_out_of_bounds_write", &resattn::emu_selftest::out_of_bounds_write,
        "A kernel that writes one element past the end of its output (for AddressSanitizer).");
  m.def("fits_int32", &resattn::cuda::fits_int32,
        "The CUDA kernels' index decision: true if 32-bit offsets reach every element of t.");
  m.def("selftest_misaligned_vector_read", &resattn::emu_selftest::misaligned_vector_read,
        "A kernel that reads 128-bit vectors from a pointer 4 bytes off alignment (for UBSan).");
  m.def("selftest_warp_shuffle", &resattn::emu_selftest::warp_shuffle,
        "Warp shuffles (down, xor, broadcast, half-warp mask): (blocks * threads, 4) floats.");
  m.def("selftest_divergent_shuffle", &resattn::emu_selftest::divergent_shuffle,
        "A shuffle whose mask names lanes that have returned: raises.");
}
