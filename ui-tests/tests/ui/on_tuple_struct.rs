use vendora_observe::Observed;

#[derive(Observed)]
#[observe(event = "pair")]
pub struct Pair(i32, i32);

fn main() {}
