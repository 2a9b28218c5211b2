use vendora_observe::Observed;

#[derive(Observed)]
#[observe(event = "status")]
pub enum Status {
    Open,
    Closed,
}

fn main() {}
