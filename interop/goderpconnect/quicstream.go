// QUIC half of the stand-in: quic-go v0.46.0 on top of derpConn, with the
// same configuration as github.com/ntnj/derpnet/derpquic.
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log"
	"math/big"
	"net"
	"time"

	"github.com/quic-go/quic-go"
)

var quicDebug = false

// quicConfig is used by both sides. quic-go clamps InitialPacketSize to its
// own 1452-byte maximum, so the 32 KiB asked for here has no wire effect
// beyond what quic-go allows; it is kept for faithfulness.
func quicConfig() *quic.Config {
	return &quic.Config{InitialPacketSize: 32 << 10}
}

// streamListener yields every stream of every accepted QUIC connection.
type streamListener struct {
	ql      *quic.Listener
	streams chan acceptedStream
}

type acceptedStream struct {
	conn   quic.Connection
	stream quic.Stream
	err    error
}

var _ net.Listener = (*streamListener)(nil)

func listenQUIC(host string, priv []byte) (*streamListener, error) {
	pc, err := openDERP(host, priv)
	if err != nil {
		return nil, err
	}
	tr := &quic.Transport{Conn: pc}
	cert, err := selfSignedLocalhost()
	if err != nil {
		return nil, err
	}
	// No NextProtos: no ALPN is offered or required.
	ql, err := tr.Listen(&tls.Config{
		ServerName:   "localhost",
		Certificates: []tls.Certificate{*cert},
	}, quicConfig())
	if err != nil {
		return nil, err
	}
	sl := &streamListener{ql: ql, streams: make(chan acceptedStream)}
	go sl.acceptConns()
	return sl, nil
}

func (sl *streamListener) acceptConns() {
	for {
		c, err := sl.ql.Accept(context.Background())
		if quicDebug {
			log.Printf("quic accept conn: %v %v", remoteOf(c), err)
		}
		if err != nil {
			if err == quic.ErrServerClosed {
				sl.streams <- acceptedStream{err: err}
				return
			}
			continue
		}
		go sl.acceptStreams(c)
	}
}

func (sl *streamListener) acceptStreams(c quic.Connection) {
	for {
		s, err := c.AcceptStream(c.Context())
		if quicDebug {
			if err == nil {
				log.Printf("quic accept stream: %v", s.StreamID())
			} else {
				log.Printf("quic accept stream error: %v", err)
			}
		}
		if err != nil {
			// An idle-timed-out connection ends its loop quietly; any other
			// error (peer closed, etc.) is handed to Accept, and the loop
			// keeps going, as upstream does.
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				return
			}
			sl.streams <- acceptedStream{err: err}
			continue
		}
		sl.streams <- acceptedStream{conn: c, stream: s}
	}
}

func remoteOf(c quic.Connection) string {
	if c == nil {
		return "<nil>"
	}
	return encodeKey([]byte(c.RemoteAddr().String()))
}

func (sl *streamListener) Accept() (net.Conn, error) {
	a := <-sl.streams
	if a.err != nil {
		return nil, a.err
	}
	return &streamConn{conn: a.conn, stream: a.stream}, nil
}

func (sl *streamListener) Addr() net.Addr { return sl.ql.Addr() }
func (sl *streamListener) Close() error   { return sl.ql.Close() }

// streamDialer makes a new QUIC connection for every Dial.
type streamDialer struct {
	tr *quic.Transport
}

func newDialer(host string, priv []byte) (*streamDialer, error) {
	pc, err := openDERP(host, priv)
	if err != nil {
		return nil, err
	}
	return &streamDialer{tr: &quic.Transport{Conn: pc}}, nil
}

func (d *streamDialer) Dial(peer []byte) (net.Conn, error) {
	// The server certificate is not checked (upstream behaviour).
	c, err := d.tr.Dial(context.Background(), derpAddr(peer), &tls.Config{InsecureSkipVerify: true}, quicConfig())
	if err != nil {
		return nil, err
	}
	s, err := c.OpenStreamSync(context.Background())
	if err != nil {
		return nil, err
	}
	return &streamConn{conn: c, stream: s}, nil
}

// streamConn is a net.Conn over one QUIC stream. Close only finishes the
// send side (FIN); CloseRead is a no-op.
type streamConn struct {
	conn   quic.Connection
	stream quic.Stream
}

var _ net.Conn = (*streamConn)(nil)

func (s *streamConn) Read(b []byte) (int, error)  { return s.stream.Read(b) }
func (s *streamConn) Write(b []byte) (int, error) { return s.stream.Write(b) }
func (s *streamConn) Close() error                { return s.stream.Close() }
func (s *streamConn) CloseWrite() error           { return s.stream.Close() }
func (*streamConn) CloseRead() error              { return nil }
func (s *streamConn) LocalAddr() net.Addr         { return s.conn.LocalAddr() }
func (s *streamConn) RemoteAddr() net.Addr        { return s.conn.RemoteAddr() }

func (s *streamConn) SetDeadline(t time.Time) error {
	s.stream.SetReadDeadline(t)
	return s.stream.SetWriteDeadline(t)
}
func (s *streamConn) SetReadDeadline(t time.Time) error  { return s.stream.SetReadDeadline(t) }
func (s *streamConn) SetWriteDeadline(t time.Time) error { return s.stream.SetWriteDeadline(t) }

// selfSignedLocalhost makes a throw-away RSA-2048 certificate, CN=localhost,
// serial 1, valid for one year from now; a fresh one on every start.
func selfSignedLocalhost() (*tls.Certificate, error) {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		Issuer:       pkix.Name{CommonName: "localhost"},
		NotBefore:    now,
		NotAfter:     now.AddDate(1, 0, 0),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		return nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)})
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	return &cert, nil
}
