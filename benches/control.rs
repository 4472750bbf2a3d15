//! The control path's cost of a reload: parse and validate a large config, then build
//! the table. Target (issue 3): under 50 ms for 1,000 routes and 200 backends.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use switchyard::config;
use switchyard::routes::{Servers, Table, TableWriter};

fn big_config() -> String {
    let mut text = String::new();
    for b in 0..200 {
        text.push_str(&format!(
            "[backends.b{b}]\nservers = [\"10.0.{}.{}:8080\", \"10.1.{}.{}:8080\"]\nversion = \"v{b}\"\n",
            b / 250,
            b % 250,
            b / 250,
            b % 250
        ));
    }
    for r in 0..1000 {
        let (a, c) = (r % 200, (r + 1) % 200);
        text.push_str(&format!(
            "[[routes]]\nname = \"route-{r}\"\nhosts = [\"svc{r}.example.com\", \"*.svc{r}.internal\"]\npath_prefix = \"/api/{r}\"\nsplit = {{ b{a} = 95, b{c} = 5 }}\nsticky = {{ header = \"x-conversation-id\" }}\n"
        ));
    }
    text
}

fn bench(c: &mut Criterion) {
    let text = big_config();
    let mut servers = Servers::default();
    let first = config::parse(&text, "bench").expect("valid").config;
    let writer = TableWriter::new(Table::build(&first, &mut servers, 1));
    let mut generation = 1;
    c.bench_function("reload: validate + build + swap, 1,000 routes / 200 backends", |b| {
        b.iter(|| {
            let checked = config::parse(black_box(&text), "bench").expect("valid");
            generation += 1;
            writer.store(Table::build(&checked.config, &mut servers, generation));
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
