//! Checkpoint and safetensors loading: `read_tensors`, `load_parts`,
//! `load` and `load_part` on the input as a checkpoint file.
#![no_main]
use kiln_core::checkpoint::{load, load_part, load_parts, read_tensors, PartMut};
use kiln_core::vars::VarStore;
use kiln_core::{DType, Device};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = kiln_fuzz::scratch();
    let p = kiln_fuzz::put(dir.path(), "last.safetensors", data);
    if read_tensors(&p, &Device::Cpu).is_err() {
        return;
    }
    let vars = VarStore::new(0);
    let vb = vars.builder(DType::F32, &Device::Cpu);
    if vb.get((2, 3), "w").is_err() {
        return;
    }
    let _ = load(&p, &vars, None);
    let _ = load_part(&p, "model", &vars);
    let other = VarStore::new(1);
    let _ = load_parts(
        &p,
        &mut [
            PartMut {
                name: "model",
                vars: &vars,
                opt: None,
            },
            PartMut {
                name: "d",
                vars: &other,
                opt: None,
            },
        ],
    );
});
