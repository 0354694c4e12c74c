# Binds a library to the shared C++ runtime (libstdc++.so.6) whatever the flags or toolchain would
# otherwise do: the runtime is named on the link line right after the objects (--no-as-needed), so
# every C++ runtime reference is bound to it before the driver's own -lstdc++, static or not, is
# reached; -static-libstdc++ is dropped from the flags. Why: a second, static copy of the runtime in
# a torch process makes every TORCH_CHECK crash (issue 14; scripts/shared_cxx_runtime.py does the
# same for setup.py and lists the causes). QKV_LIBSTDCXX overrides the library found.
# The test qkv_shared_cxx_runtime (tests/cpp) checks the result with scripts/cxx_runtime_check.py.
macro(qkv_link_shared_cxx_runtime target)
  foreach(flags_var CMAKE_CXX_FLAGS CMAKE_SHARED_LINKER_FLAGS)
    if("${${flags_var}}" MATCHES "-static-libstdc\\+\\+")
      string(REPLACE "-static-libstdc++" "" ${flags_var} "${${flags_var}}")
      message(WARNING "qkv: dropped -static-libstdc++ from ${flags_var}: qkv must share torch's C++ runtime")
    endif()
  endforeach()
  if(NOT QKV_LIBSTDCXX AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang" AND NOT APPLE AND NOT WIN32)
    execute_process(COMMAND ${CMAKE_CXX_COMPILER} -print-file-name=libstdc++.so.6
                    OUTPUT_VARIABLE _qkv_libstdcxx OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(IS_ABSOLUTE "${_qkv_libstdcxx}" AND EXISTS "${_qkv_libstdcxx}")
      get_filename_component(_qkv_libstdcxx "${_qkv_libstdcxx}" REALPATH)
      set(QKV_LIBSTDCXX "${_qkv_libstdcxx}" CACHE FILEPATH "the shared C++ runtime qkv links")
    endif()
  endif()
  if(QKV_LIBSTDCXX)
    message(STATUS "qkv: linking the shared C++ runtime ${QKV_LIBSTDCXX}")
    target_link_libraries(${target} PRIVATE "-Wl,--push-state,--no-as-needed" "${QKV_LIBSTDCXX}" "-Wl,--pop-state")
  endif()
endmacro()
