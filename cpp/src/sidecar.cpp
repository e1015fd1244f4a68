#include "sidecar.hpp"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <sys/stat.h>

#include "error.hpp"
#include "json.hpp"

namespace rtmdet {

namespace {

constexpr int kSchema = 1;  // rtmdet.export.sidecar.SCHEMA

class Reader {
 public:
  Reader(const std::string& path, const json::Value& root) : path_(path), root_(root) {}

  [[noreturn]] void fail(const std::string& key, const std::string& expected) const {
    throw RunError(path_ + ": sidecar field " + key + " must be " + expected);
  }

  const json::Value& field(const std::string& key) const {
    const json::Value* value = root_.find(key);
    if (!value) throw RunError(path_ + ": sidecar is missing the field " + key);
    return *value;
  }

  std::string text(const std::string& key) const {
    const json::Value& value = field(key);
    if (value.type != json::Value::Type::String) fail(key, "a string");
    return value.string;
  }

  int positive_int(const json::Value& value, const std::string& key) const {
    if (!value.is_integer() || value.number <= 0 || value.number > 1 << 20) fail(key, "a positive integer");
    return static_cast<int>(value.number);
  }

  std::vector<std::string> names(const std::string& key, size_t count = 0) const {
    const json::Value& value = field(key);
    std::vector<std::string> out;
    if (value.type == json::Value::Type::Array)
      for (const auto& item : value.array)
        if (item.type == json::Value::Type::String) out.push_back(item.string);
    if (value.type != json::Value::Type::Array || out.size() != value.array.size() || out.empty() ||
        (count && out.size() != count))
      fail(key, count ? "a list of " + std::to_string(count) + " names (one per stride)" : "a non-empty list of names");
    return out;
  }

  double number(const json::Value& object, const std::string& key, bool integer) const {
    const json::Value* value = object.find(key);
    if (!value || value->type != json::Value::Type::Number || (integer && !value->is_integer()) ||
        value->number < 0)
      fail("postprocess." + key, integer ? "a non-negative integer" : "a non-negative number");
    return value->number;
  }

 private:
  const std::string& path_;
  const json::Value& root_;
};

std::string read_text(const std::string& path) {
  struct stat info{};
  if (stat(path.c_str(), &info) != 0 || !S_ISREG(info.st_mode))
    throw RunError(path + ": sidecar not found; it is written by `rtmdet export` next to the model and holds "
                          "its classes and input size");
  std::ifstream file(path, std::ios::binary);
  std::ostringstream text;
  text << file.rdbuf();
  if (!file && !file.eof()) throw RunError(path + ": unreadable sidecar");
  return text.str();
}

}  // namespace

size_t Sidecar::output_index(const std::string& name) const {
  return static_cast<size_t>(std::find(outputs.begin(), outputs.end(), name) - outputs.begin());
}

std::string sidecar_path_for(const std::string& model_path) {
  size_t slash = model_path.find_last_of('/');
  size_t dot = model_path.find_last_of('.');
  bool has_suffix = dot != std::string::npos && (slash == std::string::npos || dot > slash + 1);
  return (has_suffix ? model_path.substr(0, dot) : model_path) + ".json";
}

Sidecar read_sidecar(const std::string& path) {
  json::Value root;
  try {
    root = json::parse(read_text(path));
  } catch (const std::invalid_argument& exc) {
    throw RunError(path + ": sidecar is not valid JSON (" + exc.what() + ")");
  }
  const json::Value* schema = root.find("rtmdet_export");
  if (!schema || !schema->is_integer() || schema->number != kSchema)
    throw RunError(path + ": not an rtmdet export sidecar of schema " + std::to_string(kSchema));

  Reader read(path, root);
  Sidecar s;
  s.path = path;
  s.format = read.text("format");
  if (s.format != "aoti")
    throw RunError(path + ": the sidecar of a " + s.format + " export; rtmdet_run runs AOTInductor packages "
                          "(rtmdet export --format aoti)");
  s.device = read.text("device");
  if (s.device != "cpu" && s.device != "cuda")
    throw RunError(path + ": a package compiled for " + s.device + "; rtmdet_run runs cpu and cuda packages");
  if (read.text("input_dtype") != "float32" || read.text("input_layout") != "NCHW")
    read.fail("input_dtype/input_layout", "float32 and NCHW for an AOTInductor package");
  s.classes = read.names("classes");
  s.image_size = read.positive_int(read.field("image_size"), "image_size");
  const json::Value& strides = read.field("strides");
  if (strides.type != json::Value::Type::Array || strides.array.empty()) read.fail("strides", "a list of positive integers");
  for (const auto& stride : strides.array) {
    s.strides.push_back(read.positive_int(stride, "strides"));
    if (s.image_size % s.strides.back()) read.fail("strides", "divisors of image_size");
  }
  s.cls_outputs = read.names("cls_outputs", s.strides.size());
  s.reg_outputs = read.names("reg_outputs", s.strides.size());
  s.outputs = read.names("outputs");
  std::vector<std::string> wanted = s.cls_outputs, got = s.outputs;
  wanted.insert(wanted.end(), s.reg_outputs.begin(), s.reg_outputs.end());
  std::sort(wanted.begin(), wanted.end());
  std::sort(got.begin(), got.end());
  if (wanted != got) read.fail("outputs", "the package's output names in order: each of cls_outputs and reg_outputs once");

  const json::Value& post = read.field("postprocess");
  if (post.type != json::Value::Type::Object) read.fail("postprocess", "an object");
  s.postprocess.score_thr = read.number(post, "score_thr", false);
  s.postprocess.nms_pre = static_cast<int64_t>(read.number(post, "nms_pre", true));
  s.postprocess.iou_thr = read.number(post, "iou_thr", false);
  s.postprocess.max_per_img = static_cast<int64_t>(read.number(post, "max_per_img", true));
  s.postprocess.min_bbox_size = read.number(post, "min_bbox_size", false);
  return s;
}

}  // namespace rtmdet
