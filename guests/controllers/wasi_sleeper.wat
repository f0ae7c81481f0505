;; A hostile controller that imports WASI to sleep in every step.
;;
;; ws_ctrl_step calls wasi_snapshot_preview1.poll_oneoff, the WASI sleep. Controllers get no
;; WASI imports, so the host must refuse this module when it is loaded (the server answers its
;; upload with 400 and names the missing import). Used by tests/test_server_attacks.py and
;; bench/bench_serve.py; WAT text, so no build step.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "ws_ctrl_abi_version") (result i32) i32.const 1)
  (func (export "ws_ctrl_create") (param i32 i32) (result i32) i32.const 0)
  (func (export "ws_ctrl_step") (param i32 i32) (result i32)
    (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128))))
