// goderpconnect: a test stand-in for github.com/ntnj/derpnet/cmd/derpconnect,
// which the Go module proxy does not serve. It behaves on the wire like the
// original (DERP framing, 0x00 datagram prefix, quic-go v0.46.0 settings,
// CLI, log lines). The ONLY deviation: the relay port is read from the
// DERPCONNECT_TEST_PORT environment variable (default 443), because tests
// cannot always bind port 443. See interop/README.md.
package main

import (
	"crypto/rand"
	"encoding/base64"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/crypto/curve25519"
)

var (
	flagDERP  = flag.String("derp", "", "derp server to use")
	flagKey   = flag.String("key", "derpconnect", "key file to use")
	flagDebug = flag.Bool("debug", false, "enable debug logging")
)

func encodeKey(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func main() {
	flag.Parse()
	if *flagDebug {
		derpDebug = true
		quicDebug = true
	}
	if *flagDERP == "" {
		log.Fatalln(`Provide a DERP server to use with --derp=<xxx>.tailscale.com flag.
You can find Tailscale hosted DERP server from https://login.tailscale.com/derpmap/default or use a self hosted DERP server.`)
	}
	priv, err := loadOrCreateKey(*flagKey)
	if err != nil {
		log.Fatalf("unable to generate key: %v", err)
	}

	switch flag.Arg(0) {
	case "serve":
		runServe(priv)
	case "join":
		runJoin(priv)
	default:
		log.Println(`Run "derpconnect --derp=... serve <port>" on server
Run "derpconnect --derp=... join <pubkey> <listen_port>" to connect client to server`)
	}
}

func runServe(priv []byte) {
	pub, err := curve25519.X25519(priv, curve25519.Basepoint)
	if err != nil {
		log.Fatalf("unable to get public key: %v", err)
	}
	port, err := strconv.Atoi(flag.Arg(1))
	if err != nil {
		log.Fatalf(`provide a valid port with "derpconnect serve <port>"`)
	}
	l, err := listenQUIC(*flagDERP, priv)
	if err != nil {
		log.Fatalf("unable to connect to DERP server: %v", err)
	}
	log.Printf(`Listening through DERP. Join with "derpconnect --derp=%s join %v"`, *flagDERP, encodeKey(pub))
	forward(l, func() (net.Conn, error) {
		return net.Dial("tcp", fmt.Sprintf("localhost:%d", port))
	})
}

func runJoin(priv []byte) {
	peer, err := base64.RawURLEncoding.DecodeString(flag.Arg(1))
	if err != nil || len(peer) != 32 {
		log.Fatalf(`provide correct public key of server with "derpconnect join <pubkey>": %v`, err)
	}
	port := 0
	if a := flag.Arg(2); a != "" {
		if port, err = strconv.Atoi(a); err != nil {
			log.Fatalf("unable to get port to listen to: %v", err)
		}
	}
	l, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
	if err != nil {
		log.Fatalf("unable to listen locally on port %d: %v", port, err)
	}
	d, err := newDialer(*flagDERP, priv)
	if err != nil {
		log.Fatalf("unable to connect to DERP server: %v", err)
	}
	log.Printf("Listening on %v", l.Addr())
	forward(l, func() (net.Conn, error) { return d.Dial(peer) })
}

// forward accepts forever; each accepted conn is paired with a fresh dial
// and bytes are copied both ways with half-close.
func forward(l net.Listener, dial func() (net.Conn, error)) {
	for {
		in, err := l.Accept()
		if err != nil {
			log.Printf("Error accepting connection: %v", err)
			continue
		}
		if *flagDebug {
			log.Printf("Accepted connection from %v", in.RemoteAddr())
		}
		go func(in net.Conn) {
			out, err := dial()
			if err != nil {
				log.Printf("Error connecting to target: %v", err)
				in.Close()
				return
			}
			go pipe(out, in, "out")
			go pipe(in, out, "in")
		}(in)
	}
}

type halfCloser interface {
	CloseRead() error
	CloseWrite() error
}

// pipe copies src to dst, then half-closes: CloseWrite on dst, CloseRead on src.
func pipe(dst, src net.Conn, dir string) {
	n, err := io.Copy(dst, src)
	if *flagDebug {
		log.Printf("Copied %s %d bytes %v", dir, n, err)
	}
	if h, ok := dst.(halfCloser); ok {
		h.CloseWrite()
	}
	if h, ok := src.(halfCloser); ok {
		h.CloseRead()
	}
}

// loadOrCreateKey reads the raw 32-byte private key <UserConfigDir>/derpconnect/<name>,
// creating it (mode 0400, clamped random Curve25519 scalar) on first use.
func loadOrCreateKey(name string) ([]byte, error) {
	dir, err := os.UserConfigDir()
	if err != nil {
		return nil, fmt.Errorf("unable to store key: %w", err)
	}
	path := filepath.Join(dir, "derpconnect", name)
	b, err := os.ReadFile(path)
	if err == nil {
		if len(b) != 32 {
			return nil, fmt.Errorf("invalid key length found: %d", len(b))
		}
		return b, nil
	}
	if !os.IsNotExist(err) {
		return nil, fmt.Errorf("unable to read existing key: %w", err)
	}
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return nil, fmt.Errorf("failed to generate key: %w", err)
	}
	k[0] &= 248
	k[31] &= 127
	k[31] |= 64
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("unable to create dir: %w", err)
	}
	if err := os.WriteFile(path, k, 0o400); err != nil {
		return nil, fmt.Errorf("unable to save key: %w", err)
	}
	return k, nil
}
