//! A valid component for some other world: it exports a greeter, not waft's state machine.

wit_bindgen::generate!({
    inline: "
        package example:greeter@1.0.0;
        interface greet { hello: func(name: string) -> string; }
        world greeter { export greet; }
    ",
});

struct Greeter;

impl exports::example::greeter::greet::Guest for Greeter {
    fn hello(name: String) -> String {
        format!("hello, {name}")
    }
}

export!(Greeter);
