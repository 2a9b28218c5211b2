//! Compile errors are part of the UI: each wrong `#[observe(...)]` gets one message at the
//! offending token.

#[test]
fn observe_attribute_errors() {
    // trybuild's own cargo inherits this environment: its build of the proc macros and build
    // scripts the cases depend on, which only need to run, skips debug info (measured: 62 s
    // instead of 70 s from nothing, a sixth less CPU).
    // SAFETY: the only test in this binary; no other thread reads the environment.
    unsafe { std::env::set_var("CARGO_PROFILE_DEV_DEBUG", "false") };
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
