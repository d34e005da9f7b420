//! The `.mat` path (Flowers102's `imagelabels.mat` and `setid.mat`): the
//! input is one of the two files (the first byte's low bit says which), the
//! other a valid one.
#![no_main]
use kiln_data::{Flowers102, Split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, file)) = data.split_first() else {
        return;
    };
    let dir = kiln_fuzz::scratch();
    let labels = kiln_fuzz::mat_v5(&[("labels", &[1, 2, 3, 102])]);
    let setid = kiln_fuzz::mat_v5(&[("trnid", &[1, 2]), ("valid", &[3]), ("tstid", &[4])]);
    let (l, s) = if which & 1 == 0 {
        (file, &setid[..])
    } else {
        (&labels[..], file)
    };
    kiln_fuzz::put(dir.path(), "imagelabels.mat", l);
    kiln_fuzz::put(dir.path(), "setid.mat", s);
    for split in [Split::Train, Split::Val, Split::Test] {
        let _ = Flowers102::new(dir.path(), split);
    }
});
