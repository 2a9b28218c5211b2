//! Compile errors are part of the UI: each wrong `#[observe(...)]` gets one message at the
//! offending token.

#[test]
fn observe_attribute_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
