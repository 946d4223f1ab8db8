# Writes the hand-made seed inputs (one valid request per target) that
# scripts/fuzz.sh starts from; layouts as in microvm_devices::fuzz.
#   python3 fuzz/seeds/make_seeds.py
import struct, os
root=os.path.dirname(os.path.abspath(__file__))
BASE=0x10
def desc(addr,ln,flags,nxt): return struct.pack('<QIHH',addr,ln,flags,nxt)
NEXT,WRITE=1,2
def layout(size,queues):
    r16=lambda n:(n+15)//16*16
    al=r16(6+2*size); dl=16*size; ul=r16(6+8*size)
    return [(BASE+queues*al+i*dl, BASE+i*al, BASE+queues*(al+dl)+i*ul) for i in range(queues)]
def put(m,addr,b):
    if len(m)<addr+len(b): m.extend(bytes(addr+len(b)-len(m)))
    m[addr:addr+len(b)]=b
def avail(m,addr,heads,flags=0):
    put(m,addr,struct.pack('<HH',flags,len(heads))+b''.join(struct.pack('<H',h) for h in heads))
def save(target,name,data):
    os.makedirs(f'{root}/{target}',exist_ok=True)
    open(f'{root}/{target}/{name}','wb').write(bytes(data))
SEL4=2
for name,typ in [('read',0),('write',1)]:
    m=bytearray(); (d,a,u)=layout(4,1)[0]
    avail(m,a,[0])
    put(m,d,desc(0x200,16,NEXT,1)+desc(0x400,512,(WRITE if typ==0 else 0)|NEXT,2)+desc(0x800,1,WRITE,0))
    put(m,0x200,struct.pack('<IIQ',typ,0,1))
    if typ==1: put(m,0x400,b'fuzz'*128)
    save('virtio_block',name,bytes([SEL4,0])+m)
m=bytearray(); (d,a,u)=layout(4,1)[0]; avail(m,a,[0]); put(m,d,desc(0x200,64,WRITE,0)); save('virtio_rng','one-buffer',bytes([SEL4,0])+m)
m=bytearray(); L=layout(4,2)
put(m,0,b'\x01')
avail(m,L[0][1],[0]); put(m,L[0][0],desc(0x800,1600,WRITE,0))
avail(m,L[1][1],[0]); put(m,L[1][0],desc(0x400,12+60,0,0)); put(m,0x400,bytes(12)+bytes(range(60)))
save('virtio_net','rx-and-tx',bytes([SEL4,0])+m)
m=bytearray(); L=layout(4,3)
avail(m,L[0][1],[0,1]); put(m,L[0][0],desc(0x800,44+256,WRITE,0)+desc(0xa00,44+256,WRITE,0))
avail(m,L[1][1],[0]); put(m,L[1][0],desc(0x400,44,0,0))
hdr=struct.pack('<QQIIIHHIII',3,2,1234,1024,0,1,1,0,65536,0)
put(m,0x400,hdr)
save('virtio_vsock','guest-connect',bytes([SEL4,1])+m)
save('vsock_connect_line','connect-1024',b'\x00CONNECT 1024\n')
save('vsock_connect_line','connect-half-closed',b'\x01CONNECT 52\n')
ops=[]
def w(off,val): ops.append(struct.pack('<BHBI',1,off,2,val))
def r(off): ops.append(struct.pack('<BHBI',0,off,2,0))
r(0x000); r(0x004); r(0x008)
w(0x070,1); w(0x070,3)
w(0x014,1); r(0x010); w(0x024,1); w(0x020,1)
w(0x024,0); w(0x020,0)
w(0x070,11); r(0x070)
(d,a,u)=layout(4,1)[0]
w(0x030,0); r(0x034); w(0x038,4)
w(0x080,d); w(0x084,0); w(0x090,a); w(0x094,0); w(0x0a0,u); w(0x0a4,0); w(0x044,1)
w(0x070,15); r(0x060); w(0x064,1); r(0x100)
m=bytearray(); avail(m,a,[0]); put(m,d,desc(0x200,16,NEXT,1)+desc(0x400,512,WRITE|NEXT,2)+desc(0x800,1,WRITE,0))
save('virtio_mmio','driver-init-and-read',bytes([len(ops)])+b''.join(ops)+m)
sops=[]
for ch in b'hello\n': sops+= [1, ch]
sops+=[0|(5<<1),0, 0|(2<<1),0, 1|(3<<1),0x80, 1,1, 1|(3<<1),0x03, 1|(1<<1),0x0f]
save('serial','hello-and-registers',bytes([16])+bytes(sops))
