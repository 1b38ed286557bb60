#![no_main]
// Logic and input layout: vfio_user_proto::fuzzing::command_replies (also replayed by
// crates/vfio-user-proto/tests/fuzz_corpus.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vfio_user_proto::fuzzing::command_replies(data));
