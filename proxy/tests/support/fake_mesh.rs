pub struct FakeMesh;
