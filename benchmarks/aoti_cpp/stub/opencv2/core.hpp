// Stand-in for OpenCV's core header where OpenCV's development files are missing (the H200
// machine has none): cpp/src/model.cpp reads only Mat::data of the canvas it is given.
#pragma once
namespace cv {
struct Mat {
  unsigned char* data = nullptr;
};
}  // namespace cv
