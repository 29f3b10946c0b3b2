# Steps 2 and 3 of the README quick start, verbatim.
from sqlalchemy import Column, Integer, String  
from sqlalchemy.orm import declarative_base


Base = declarative_base()  
  
  
class User(Base):  
    __tablename__ = "users"  
    id = Column(Integer, primary_key=True, autoincrement=True)  
    name = Column(String, unique=True)  
    position = Column(String)  


from alchemium import CrudRepository  

class UserRepository(CrudRepository):  
	model = User  
