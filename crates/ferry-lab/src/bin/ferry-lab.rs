//! `ferry-lab`: the lab, the demo and the benchmarks. Users run it as `ferry lab ...`,
//! `ferry demo ...` and `ferry bench ...` (the `ferry` binary execs it with the same
//! arguments); it also runs the server inside every lab pod.

fn main() {
    ferry_lab::app::main()
}
