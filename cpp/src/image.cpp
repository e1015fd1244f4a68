#include "image.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sys/stat.h>
#include <vector>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "error.hpp"

namespace rtmdet {

cv::Mat read_image(const std::string& path) {
  struct stat info{};
  if (stat(path.c_str(), &info) != 0) throw RunError(path + ": image file not found");
  if (!S_ISREG(info.st_mode)) throw RunError(path + ": not an image file (a folder or a device)");
  std::ifstream file(path, std::ios::binary);
  if (!file) throw RunError(path + ": cannot read image file (" + std::strerror(errno) + ")");
  std::vector<uchar> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (bytes.empty()) throw RunError(path + ": image file is empty");
  cv::Mat image;
  try {
    // imdecode, as Python's read_image (np.fromfile + cv2.imdecode), not imread: the same code path.
    image = cv::imdecode(bytes, cv::IMREAD_COLOR);
  } catch (const cv::Exception&) {
    image.release();
  }
  if (image.empty() || image.type() != CV_8UC3)
    throw RunError(path + ": not a readable image (corrupt or unsupported format)");
  return image;
}

Letterboxed letterbox(const cv::Mat& image, int size, int pad_value) {
  Letterboxed out;
  out.ori_w = image.cols;
  out.ori_h = image.rows;
  // rtmdet.inference.preprocess.rescale_size, in the same double arithmetic (Python floats).
  const double w = out.ori_w, h = out.ori_h;
  const double scale = std::min(size / std::max(w, h), size / std::min(w, h));
  out.new_w = static_cast<int>(w * scale + 0.5);
  out.new_h = static_cast<int>(h * scale + 0.5);
  cv::Mat resized = image;
  if (out.new_w != out.ori_w || out.new_h != out.ori_h)
    cv::resize(image, resized, cv::Size(out.new_w, out.new_h), 0, 0, cv::INTER_LINEAR);
  out.canvas = cv::Mat(size, size, CV_8UC3, cv::Scalar(pad_value, pad_value, pad_value));
  resized.copyTo(out.canvas(cv::Rect(0, 0, out.new_w, out.new_h)));
  out.scale_w = out.new_w / w;
  out.scale_h = out.new_h / h;
  return out;
}

}  // namespace rtmdet
