// Reading a photo and letterboxing it exactly as rtmdet.imageio.read_image and
// rtmdet.inference.preprocess.letterbox do (OpenCV on both sides: the same decoders, the same
// fixed-point bilinear resize), so the model sees the same bytes as in Python.
#pragma once

#include <string>

#include <opencv2/core.hpp>

namespace rtmdet {

constexpr int kPadValue = 114;  // rtmdet.inference.preprocess.PAD_VALUE

// An image file as HxWx3 BGR uint8 (grayscale and RGBA converted, EXIF orientation applied:
// cv::imdecode with IMREAD_COLOR, as Python's read_image); RunError naming the file otherwise.
cv::Mat read_image(const std::string& path);

struct Letterboxed {
  cv::Mat canvas;         // size x size x 3 uint8, the image at the top-left, padding 114
  int ori_w = 0, ori_h = 0;
  int new_w = 0, new_h = 0;  // the resized image inside the canvas
  double scale_w = 1.0, scale_h = 1.0;  // new_w / ori_w, new_h / ori_h (LetterboxInfo.scale_wh)
};

// Keep-ratio resize (mmcv's rescale: int(w * scale + 0.5)), INTER_LINEAR, pad bottom/right.
Letterboxed letterbox(const cv::Mat& image, int size, int pad_value = kPadValue);

}  // namespace rtmdet
