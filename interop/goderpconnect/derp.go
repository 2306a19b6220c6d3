// DERP client half of the stand-in: a net.PacketConn whose "addresses" are
// 32-byte Curve25519 public keys and whose datagrams travel through one
// Tailscale DERP relay connection.
//
// Wire behaviour mirrors github.com/ntnj/derpnet (see /work/shared/go-derpnet.md
// and interop/README.md). The single deviation is DERPCONNECT_TEST_PORT.
package main

import (
	"bufio"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"math"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"golang.org/x/crypto/curve25519"
	"golang.org/x/crypto/nacl/box"
)

// DERP frame types used (or deliberately ignored) by this client.
const (
	fServerKey  byte = 0x01
	fClientInfo byte = 0x02
	fServerInfo byte = 0x03
	fSendPacket byte = 0x04
	fRecvPacket byte = 0x05
	fKeepAlive  byte = 0x06
	fPing       byte = 0x12
	fPong       byte = 0x13
)

// serverKeyMagic is the 8-byte prefix of the ServerKey frame: "DERP" + U+1F511.
const serverKeyMagic = "DERP\xf0\x9f\x94\x91"

// recvQueueLen is how many received datagrams are buffered before the
// oldest one is thrown away.
const recvQueueLen = 10

var derpDebug = false

// derpPort returns the TCP port of the relay. The original always uses 443;
// DERPCONNECT_TEST_PORT exists only so tests can run a relay elsewhere.
func derpPort() string {
	if p := os.Getenv("DERPCONNECT_TEST_PORT"); p != "" {
		return p
	}
	return "443"
}

// derpAddr is a peer address: the raw 32 public-key bytes.
type derpAddr []byte

func (derpAddr) Network() string  { return "derp" }
func (a derpAddr) String() string { return string(a) }

// derpConn implements net.PacketConn over one DERP relay connection.
type derpConn struct {
	tlsConn net.Conn
	rw      *bufio.ReadWriter

	priv [32]byte
	pub  [32]byte

	inbox    chan []byte // RecvPacket payloads: src(32) ‖ version byte ‖ datagram
	deadline *time.Timer
	closed   chan struct{}

	wmu sync.Mutex // serialises frame writes (and the handshake)
}

var _ net.PacketConn = (*derpConn)(nil)

// openDERP connects to host over TLS and performs the DERP handshake.
func openDERP(host string, priv []byte) (*derpConn, error) {
	pub, err := curve25519.X25519(priv, curve25519.Basepoint)
	if err != nil {
		return nil, err
	}
	dc := &derpConn{
		inbox:    make(chan []byte, recvQueueLen),
		deadline: time.NewTimer(time.Duration(math.MaxInt64)),
		closed:   make(chan struct{}, 1),
	}
	copy(dc.priv[:], priv)
	copy(dc.pub[:], pub)
	if err := dc.handshake(host); err != nil {
		return nil, err
	}
	return dc, nil
}

func (dc *derpConn) handshake(host string) (err error) {
	dc.wmu.Lock()
	defer dc.wmu.Unlock()

	raw, err := net.Dial("tcp", net.JoinHostPort(host, derpPort()))
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			raw.Close()
		}
	}()
	// System roots (SSL_CERT_FILE / SSL_CERT_DIR honoured), SNI = host.
	tc := tls.Client(raw, &tls.Config{ServerName: host})
	dc.tlsConn = tc

	// The upgrade request is written in net/http's Request.Write form; the
	// HTTP response is never read: with Derp-Fast-Start the relay sends
	// the ServerKey frame straight away.
	req, err := http.NewRequest(http.MethodGet, "/derp", nil)
	if err != nil {
		return fmt.Errorf("error creating request: %w", err)
	}
	req.Header.Set("User-Agent", "ntnj/derpnet")
	req.Header.Set("Upgrade", "DERP")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Derp-Fast-Start", "1")
	if err := req.Write(tc); err != nil {
		return fmt.Errorf("error creating connection: %w", err)
	}

	dc.rw = bufio.NewReadWriter(bufio.NewReader(tc), bufio.NewWriter(tc))

	srvKey, err := dc.readServerKey()
	if err != nil {
		return err
	}
	if err := dc.writeClientInfo(srvKey); err != nil {
		return err
	}
	if err := dc.readServerInfo(srvKey); err != nil {
		return err
	}
	go dc.readLoop()
	return nil
}

func (dc *derpConn) readServerKey() ([32]byte, error) {
	var k [32]byte
	t, body, err := readDERPFrame(dc.rw.Reader)
	if err != nil {
		return k, err
	}
	if t != fServerKey || len(body) != 40 || string(body[:8]) != serverKeyMagic {
		return k, fmt.Errorf("unexpected: %d %v", t, string(body))
	}
	copy(k[:], body[8:])
	return k, nil
}

func (dc *derpConn) writeClientInfo(srvKey [32]byte) error {
	info, err := json.Marshal(map[string]any{"version": 2, "CanAckPings": true})
	if err != nil {
		return err
	}
	var nonce [24]byte
	if _, err := io.ReadFull(rand.Reader, nonce[:]); err != nil {
		return err
	}
	out := make([]byte, 0, 32+24+len(info)+box.Overhead)
	out = append(out, dc.pub[:]...)
	out = append(out, nonce[:]...)
	out = box.Seal(out, info, &nonce, &srvKey, &dc.priv)
	return writeDERPFrame(dc.rw.Writer, fClientInfo, out)
}

func (dc *derpConn) readServerInfo(srvKey [32]byte) error {
	t, body, err := readDERPFrame(dc.rw.Reader)
	if err != nil {
		return err
	}
	if t != fServerInfo || len(body) < 24 {
		return fmt.Errorf("unexpected: %d %v", t, string(body))
	}
	var nonce [24]byte
	copy(nonce[:], body[:24])
	plain, ok := box.Open(nil, body[24:], &nonce, &srvKey, &dc.priv)
	if !ok {
		return fmt.Errorf("unable to unseal: %v", string(body))
	}
	if derpDebug {
		log.Printf("Server info: %s", plain)
	}
	return nil
}

// readLoop runs for the life of the relay connection. When the relay goes
// away it simply stops: there is no reconnect and ReadFrom blocks forever
// (exactly like the original).
func (dc *derpConn) readLoop() {
	for {
		t, body, err := readDERPFrame(dc.rw.Reader)
		if err != nil {
			return
		}
		switch t {
		case fKeepAlive:
		case fPing:
			go func(payload []byte) {
				dc.wmu.Lock()
				defer dc.wmu.Unlock()
				writeDERPFrame(dc.rw.Writer, fPong, payload)
			}(body)
		case fRecvPacket:
			// Drop-oldest when full. The original does `<-inbox; inbox <- body` here, which
			// blocks forever if the reader drains the queue between the two steps: its
			// reader goroutine then stops reading and the relay drops the connection (a
			// race seen under load in CI). This loop is the one deliberate fix (see README).
			for {
				select {
				case dc.inbox <- body:
				default:
					select {
					case <-dc.inbox:
					default:
					}
					continue
				}
				break
			}
		default:
			// PeerGone, PeerPresent, Health, Restarting, ...: ignored.
		}
	}
}

// ReadFrom returns the next datagram. A datagram that does not fit in p is
// an io.ErrShortBuffer error (not a net.Error), as in the original.
func (dc *derpConn) ReadFrom(p []byte) (int, net.Addr, error) {
	select {
	case msg, ok := <-dc.inbox:
		if !ok {
			return 0, nil, net.ErrClosed
		}
		if len(msg) <= 32 || msg[32] != 0x00 {
			return 0, nil, errors.New("unexpected data")
		}
		data := msg[33:]
		n := copy(p, data)
		if n < len(data) {
			return 0, nil, io.ErrShortBuffer
		}
		return n, derpAddr(msg[:32]), nil
	case <-dc.deadline.C:
		return 0, nil, os.ErrDeadlineExceeded
	}
}

// WriteTo sends p to the peer key addr as SendPacket(dst, 0x00 ‖ p).
func (dc *derpConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	if addr.Network() != "derp" {
		return 0, fmt.Errorf("unsupported protocol: %v", addr.Network())
	}
	dc.wmu.Lock()
	defer dc.wmu.Unlock()
	if err := writeDERPFrame(dc.rw.Writer, fSendPacket, []byte(addr.String()), []byte{0x00}, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (dc *derpConn) Close() error {
	dc.wmu.Lock()
	defer dc.wmu.Unlock()
	select {
	case <-dc.closed:
		return nil
	default:
	}
	err := dc.tlsConn.Close()
	dc.closed <- struct{}{}
	close(dc.closed)
	close(dc.inbox)
	return err
}

func (dc *derpConn) LocalAddr() net.Addr { return derpAddr(dc.pub[:]) }

func (*derpConn) SetDeadline(time.Time) error { return errors.New("unimplemented") }

func (dc *derpConn) SetReadDeadline(t time.Time) error {
	if t.IsZero() {
		dc.deadline.Stop()
	} else {
		dc.deadline.Reset(time.Until(t))
	}
	return nil
}

func (*derpConn) SetWriteDeadline(time.Time) error { return errors.New("unimplemented") }

// readDERPFrame reads type(1) ‖ big-endian uint32 length ‖ payload.
func readDERPFrame(r *bufio.Reader) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	body := make([]byte, binary.BigEndian.Uint32(hdr[1:]))
	_, err := io.ReadFull(r, body)
	if derpDebug {
		log.Printf("derp: recv frame type=0x%02x len=%d", hdr[0], len(body))
	}
	return hdr[0], body, err
}

// writeDERPFrame writes one frame whose payload is the concatenation of
// parts, then flushes.
func writeDERPFrame(w *bufio.Writer, t byte, parts ...[]byte) error {
	total := 0
	for _, p := range parts {
		total += len(p)
	}
	var hdr [5]byte
	hdr[0] = t
	binary.BigEndian.PutUint32(hdr[1:], uint32(total))
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	for _, p := range parts {
		if _, err := w.Write(p); err != nil {
			return err
		}
	}
	if derpDebug {
		log.Printf("derp: send frame type=0x%02x len=%d", t, total)
	}
	return w.Flush()
}
