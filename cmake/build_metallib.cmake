# Builds OUT_DIR/TITLE.metallib from SOURCES (run with cmake -P at build time, from the
# custom command in CMakeLists.txt).
#
# The compile options are those of MLX's mlx_build_metallib (share/cmake/MLX/extension.cmake
# in MLX 0.32.4), notably -fno-fast-math. MODE auto: when the Metal compiler fails, the
# error goes to OUT_DIR/moequant_metal_error.txt, a warning is printed and the build goes
# on CPU-only (moequant reports it at import and in metal_status()). MODE on: the build
# stops at the error.
#
# Variables: MODE, COMPILER (a ;-list, e.g. xcrun;-sdk;macosx;metal), SOURCES,
# INCLUDE_DIRS, OUT_DIR, TITLE, DEPLOYMENT_TARGET (optional), STAMP.
cmake_minimum_required(VERSION 3.24)

set(lib "${OUT_DIR}/${TITLE}.metallib")
set(err_file "${OUT_DIR}/moequant_metal_error.txt")
file(REMOVE "${lib}" "${err_file}")

set(options -Wall -Wextra -fno-fast-math -Wno-c++17-extensions -Wno-c++20-extensions
            -Wmetal-addr-spaces)
set(link_options)
if(DEPLOYMENT_TARGET)
  list(APPEND options "-mmacosx-version-min=${DEPLOYMENT_TARGET}")
  list(APPEND link_options "-mmacosx-version-min=${DEPLOYMENT_TARGET}")
endif()
set(includes)
foreach(d IN LISTS INCLUDE_DIRS)
  list(APPEND includes "-I${d}")
endforeach()

function(metal_failed what rc output)
  string(REGEX REPLACE "\n.*" "" first "${output}")
  if(first STREQUAL "")
    set(first "exit status ${rc}")
  endif()
  string(REPLACE ";" " " cmd "${COMPILER}")
  set(msg "the Metal compiler (${cmd}) failed on ${what}: ${first}")
  file(WRITE "${err_file}" "${msg}\n\ncommand: ${COMPILER}\nexit: ${rc}\n\n${output}\n")
  if(MODE STREQUAL "on")
    message(FATAL_ERROR "moequant (MOEQUANT_METAL=on): ${msg}\n${output}")
  endif()
  message(WARNING
    "moequant (MOEQUANT_METAL=auto): ${msg}\n"
    "Continuing with a CPU-only install: the CPU ops work, GPU-stream calls raise, "
    "moequant.metal_available() is False and importing moequant warns. "
    "Full compiler output: ${err_file}. Build with MOEQUANT_METAL=on to stop here.")
  set(failed TRUE PARENT_SCOPE)
endfunction()

set(failed FALSE)
set(airs)
set(i 0)
foreach(src IN LISTS SOURCES)
  get_filename_component(stem "${src}" NAME_WE)
  set(air "${OUT_DIR}/${TITLE}_${i}_${stem}.air")
  execute_process(
    COMMAND ${COMPILER} ${includes} ${options} -c "${src}" -o "${air}"
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc STREQUAL "0")
    metal_failed("${src}" "${rc}" "${out}")
    break()
  endif()
  list(APPEND airs "${air}")
  math(EXPR i "${i} + 1")
endforeach()
if(NOT failed)
  execute_process(
    COMMAND ${COMPILER} ${link_options} ${airs} -o "${lib}"
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc STREQUAL "0")
    metal_failed("linking ${TITLE}.metallib" "${rc}" "${out}")
  endif()
endif()
file(TOUCH "${STAMP}")
