# Included by scripts/setup.sh's llama.cpp configure (CMAKE_PROJECT_INCLUDE, after each project() call).
# Compiles llama.cpp's command-line support libraries at -O1 instead of the Release -O3: llama-common (argument
# parsing, chat templates, JSON, downloads), llama-common-base and the vendored cpp-httplib are a third of the
# build's compile time and run on no measured path: the kernels (ggml, ggml-cpu), libllama (what llama-cpp-python
# loads and llama-bench times) and the tools' own sources keep -O3. A target's COMPILE_OPTIONS come after
# CMAKE_CXX_FLAGS_RELEASE on the command line, so -O1 wins there. Needs cmake_language(DEFER), CMake 3.19.
include_guard(GLOBAL)
if(CMAKE_VERSION VERSION_LESS 3.19)
  return()
endif()

function(quantloop_lighter_support_libraries)
  foreach(target llama-common llama-common-base cpp-httplib)
    if(TARGET ${target})
      set_property(TARGET ${target} APPEND PROPERTY COMPILE_OPTIONS -O1)
    endif()
  endforeach()
endfunction()

# the targets exist only once the top-level CMakeLists.txt has added every subdirectory
cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL quantloop_lighter_support_libraries)
