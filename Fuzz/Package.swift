// swift-tools-version:6.0
// libFuzzer targets for the parsers that read untrusted input. Not part of the main build:
// build and run them with scripts/fuzz.sh (which passes --sanitize=fuzzer --sanitize=address).
import PackageDescription

// A path dependency's identity is its directory's name, which depends on where the repository
// was cloned; `.package(name:path:)` pins the name the product references use.
let sidecar = Target.Dependency.product(name: "AuthzSidecar", package: "authz-sidecar")
let introspection = Target.Dependency.product(name: "Introspection", package: "authz-sidecar")
let jose = Target.Dependency.product(name: "JOSE", package: "authz-sidecar")
let sharedCache = Target.Dependency.product(name: "SharedCache", package: "authz-sidecar")

let package = Package(
    name: "authz-sidecar-fuzz",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "authz-sidecar", path: ".."),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.0"),
    ],
    targets: [
        .executableTarget(name: "FuzzBearer", dependencies: [sidecar]),
        .executableTarget(name: "FuzzCertificate", dependencies: [sidecar, introspection]),
        .executableTarget(name: "FuzzXFCC", dependencies: [sidecar]),
        .executableTarget(name: "FuzzIntrospectionResponse", dependencies: [introspection]),
        .executableTarget(name: "FuzzConfig", dependencies: [sidecar]),
        .executableTarget(name: "FuzzJOSE", dependencies: [jose, introspection]),
        .executableTarget(name: "FuzzRESP", dependencies: [sharedCache, introspection, .product(name: "NIOCore", package: "swift-nio")]),
        .executableTarget(name: "FuzzPaths", dependencies: [sidecar, introspection, .product(name: "NIOHTTP1", package: "swift-nio")]),
    ]
)
