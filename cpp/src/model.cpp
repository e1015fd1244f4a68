#include "model.hpp"

#include <cstring>
#include <fstream>
#include <sys/stat.h>

#include <ATen/Context.h>
#include <ATen/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "error.hpp"

namespace rtmdet {

struct AotiModel::Impl {
  std::string path;
  Sidecar sidecar;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
};

// A .pt2 is a zip archive: anything else (an .onnx, a text file) fails here in one line instead
// of deep inside the loader.
void check_package_file(const std::string& path) {
  struct stat info{};
  if (stat(path.c_str(), &info) != 0 || !S_ISREG(info.st_mode)) throw RunError(path + ": exported model not found");
  std::ifstream file(path, std::ios::binary);
  char head[4] = {0, 0, 0, 0};
  file.read(head, sizeof head);
  if (file.gcount() == 0) throw RunError(path + ": not an AOTInductor package (empty file, 0 bytes)");
  if (file.gcount() < 4 || std::memcmp(head, "PK\x03\x04", 4) != 0)
    throw RunError(path + ": not an AOTInductor package (not a zip archive; `rtmdet export --format aoti` "
                          "writes one)");
}

namespace {

std::string message_of(const std::exception& exc) {
  if (auto* torch_error = dynamic_cast<const c10::Error*>(&exc)) return first_line(torch_error->what_without_backtrace());
  return first_line(exc.what());
}

std::string shape_text(const at::Tensor& t) {
  std::string text = "[";
  for (int64_t d = 0; d < t.dim(); ++d) text += (d ? ", " : "") + std::to_string(t.size(d));
  return text + "]";
}

// One output as a flat float vector on the host, checked to be [1, cells, channels].
std::vector<float> take(const at::Tensor& out, int64_t cells, int64_t channels, const std::string& name,
                        const std::string& where) {
  if (out.dim() != 3 || out.size(0) != 1 || out.size(1) != cells || out.size(2) != channels)
    throw RunError(where + ": output " + name + " has shape " + shape_text(out) + ", not [1, " +
                   std::to_string(cells) + ", " + std::to_string(channels) + "]");
  at::Tensor flat = out.cpu().to(at::kFloat).contiguous();
  const float* data = flat.data_ptr<float>();
  return std::vector<float>(data, data + flat.numel());
}

}  // namespace

AotiModel::AotiModel(const std::string& path, const Sidecar& sidecar) : impl_(std::make_unique<Impl>()) {
  check_package_file(path);
  impl_->path = path;
  impl_->sidecar = sidecar;
  // libtorch.so of a CUDA wheel loads libtorch_cuda, which registers CUDA; no GPU or a CPU-only
  // libtorch: one line here, not an error from inside the loader.
  if (sidecar.device == "cuda" && !at::hasCUDA())
    throw RunError(path + ": a package compiled for cuda, and libtorch here sees no CUDA GPU (export one with "
                          "--device cpu)");
  try {
    impl_->loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
  } catch (const std::exception& exc) {  // c10::Error for a broken archive or library
    throw RunError(path + ": not a loadable AOTInductor package (" + message_of(exc) + ")");
  }
}

AotiModel::~AotiModel() = default;

std::vector<LevelOutputs> AotiModel::run(const cv::Mat& canvas) const {
  const Sidecar& s = impl_->sidecar;
  const int64_t size = s.image_size;
  const std::string where = s.path + ": does not match " + impl_->path;
  // HWC uint8 -> NCHW float32 pixels 0..255 (the normalization is inside the package).
  at::Tensor hwc = at::from_blob(canvas.data, {size, size, 3}, at::TensorOptions().dtype(at::kByte));
  at::Tensor input = hwc.permute({2, 0, 1}).unsqueeze(0).to(at::kFloat).contiguous();
  if (s.device == "cuda") input = input.to(at::Device(at::kCUDA));
  std::vector<at::Tensor> outputs;
  try {
    outputs = impl_->loader->run({input});
  } catch (const std::exception& exc) {  // the package's own shape guards
    throw RunError(where + ": it does not run on a [1, 3, " + std::to_string(size) + ", " + std::to_string(size) +
                   "] input (" + message_of(exc) + ")");
  }
  if (outputs.size() != s.outputs.size())
    throw RunError(where + ": the package has " + std::to_string(outputs.size()) + " outputs, the sidecar names " +
                   std::to_string(s.outputs.size()));
  std::vector<LevelOutputs> levels;
  for (size_t l = 0; l < s.strides.size(); ++l) {
    const int64_t side = size / s.strides[l];
    LevelOutputs level;
    level.cls = take(outputs[s.output_index(s.cls_outputs[l])], side * side, int64_t(s.classes.size()),
                     s.cls_outputs[l], where);
    level.reg = take(outputs[s.output_index(s.reg_outputs[l])], side * side, 4, s.reg_outputs[l], where);
    levels.push_back(std::move(level));
  }
  return levels;
}

void set_threads(int threads) {
  if (threads > 0) at::set_num_threads(threads);
}

}  // namespace rtmdet
