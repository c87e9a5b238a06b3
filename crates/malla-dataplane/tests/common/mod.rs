//! What the dataplane's kernel tests share: a namespace of their own with an underlay
//! interface, where a test runs on a current-thread runtime and which is deleted afterwards.

use malla_dataplane::netns::{self, NetNs};

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Creates namespace `name` with underlay `ul0` (`198.19.0.11/24`, and `fd00:198:19::11/64`
/// when `v6`), runs `test` inside it and deletes it, failing afterwards if `test` failed.
pub fn in_namespace<F>(name: &str, v6: bool, test: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    netns::create(name).unwrap();
    let mut setup = vec![
        // No dummy driver here: a veth pair, both ends in the namespace.
        vec![
            "-n", name, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0p",
        ],
        vec!["-n", name, "link", "set", "ul0p", "up"],
        vec!["-n", name, "addr", "add", "198.19.0.11/24", "dev", "ul0"],
    ];
    if v6 {
        setup.push(vec![
            "-n",
            name,
            "addr",
            "add",
            "fd00:198:19::11/64",
            "dev",
            "ul0",
            "nodad",
        ]);
    }
    setup.push(vec!["-n", name, "link", "set", "ul0", "up"]);
    let result = setup
        .iter()
        .try_for_each(|args| netns::run_ip(args))
        .map_err(|e| e.to_string())
        .and_then(|()| NetNs::open_named(name).map_err(|e| e.to_string()))
        .and_then(|ns| {
            ns.run(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(test());
            })
            .map_err(|e| e.to_string())
        });
    netns::delete(name).unwrap();
    result.unwrap();
}
