// The `<model>.json` sidecar of an AOTInductor export (`rtmdet export --format aoti`): the fields
// this runner needs, read and checked (rtmdet/export/sidecar.py writes it; its `conventions`
// say in words what the code here and in letterbox/postprocess does).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rtmdet {

// rtmdet.inference.PostprocessConfig; the sidecar's `postprocess` holds the defaults.
struct PostprocessConfig {
  double score_thr = 0.001;
  int64_t nms_pre = 30000;
  double iou_thr = 0.65;
  int64_t max_per_img = 300;
  double min_bbox_size = 0.0;
};

struct Sidecar {
  std::string path;
  std::string format;  // "aoti"
  std::string device;  // "cpu" or "cuda": where the package's kernels run
  std::vector<std::string> classes;
  int image_size = 0;
  std::vector<int> strides;
  std::vector<std::string> cls_outputs, reg_outputs;  // per stride
  std::vector<std::string> outputs;                   // the package's positional outputs, by name
  PostprocessConfig postprocess;

  // Position of `name` in `outputs` (checked to exist when read).
  size_t output_index(const std::string& name) const;
};

// "model.pt2" -> "model.json", as rtmdet.export.sidecar.meta_path (Path.with_suffix).
std::string sidecar_path_for(const std::string& model_path);

// Read and check a sidecar; RunError naming the file for a missing, malformed or foreign one.
Sidecar read_sidecar(const std::string& path);

}  // namespace rtmdet
