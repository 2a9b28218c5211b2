//! The three entities of the original Laravel design: Product, Category and Order.

pub mod category;
pub mod order;
pub mod product;
